"""Execute a plan: run each stage that is not up to date, record its state, say why."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.checkpoints import refuse_abandoning
from runner.context import Context
from runner.errors import Interrupted, RecipeError, StageError
from runner.plan import STAGE_NAMES, StageStatus, compute_plan, state_path
from runner.quiet import quiet_libraries
from runner.recipe import Recipe
from runner.state import (
    OWNER_FILE,
    claim_run_dir,
    describe_path,
    is_disk_full,
    new_state,
    run_lock,
    write_json_atomic,
)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_resolved_recipe(recipe: Recipe) -> None:
    path = recipe.run_dir / "recipe.resolved.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(recipe.to_toml(), encoding="utf-8")
    tmp.replace(path)


def check_ownership(recipe: Recipe, force: bool) -> None:
    """Never run into the run directory of a different recipe without --force."""
    marker = recipe.run_dir / OWNER_FILE
    import json

    if marker.is_file():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = {}
        if owner.get("name") != recipe.name and not force:
            raise RecipeError(
                f"{recipe.run_dir}: holds the runs of recipe {owner.get('name')!r}, "
                f"not {recipe.name!r}; "
                "set recipe.output_dir to another folder, or pass --force to reuse it"
            )
    write_json_atomic(marker, {"name": recipe.name, "recipe": str(recipe.path)})


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so both save a checkpoint and mark the stage interrupted."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _record_end(path: Path, state: dict[str, Any]) -> None:
    """Best effort: when the disk is full the file keeps saying `running`, which stays honest."""
    with contextlib.suppress(OSError):
        write_json_atomic(path, state)


def run_stage(ctx: Context, st: StageStatus) -> dict[str, Any]:
    state = new_state(st.name) | {
        "status": "running",
        **st.identity(),
        "started": _now(),
        "ended": None,
        "metrics": {},
        "outputs": [],
    }
    path = state_path(ctx.run_dir, st.name)
    write_json_atomic(path, state)

    def progress(metrics: dict[str, Any]) -> None:
        state["metrics"] = {**state["metrics"], **metrics}
        write_json_atomic(path, state)

    ctx.on_progress = progress
    ctx.fingerprint = st.fingerprint
    ctx.status = st
    quiet_libraries()
    module = importlib.import_module(f"runner.stages.{st.stage.module}")
    t0 = time.monotonic()
    try:
        metrics = module.run(ctx)
    except (KeyboardInterrupt, Interrupted):
        state.update(status="interrupted", ended=_now())
        _record_end(path, state)
        raise Interrupted(st.name) from None
    except (RecipeError, StageError):
        state.update(status="failed", ended=_now())
        _record_end(path, state)
        raise
    except Exception as e:
        state.update(status="failed", ended=_now())
        _record_end(path, state)
        if is_disk_full(e):
            raise StageError(
                st.name,
                f"disk full while writing {getattr(e, 'filename', None) or ctx.run_dir}; "
                "free space and run again (finished stages are kept)",
            ) from e
        raise StageError(st.name, f"{type(e).__name__}: {e}".splitlines()[0]) from e
    outputs = []
    elsewhere = st.name == "train" and ctx.recipe.get("launch.machine_rank") > 0  # on machine 0
    for rel in () if elsewhere else st.stage.outputs:
        if not (ctx.run_dir / rel).exists():
            state.update(status="failed", ended=_now())
            _record_end(path, state)
            raise StageError(
                st.name,
                f"finished without writing {ctx.run_dir / rel}; "
                "this is a bug in the stage, please report it",
            )
        outputs.append({"path": rel, **describe_path(ctx.run_dir / rel)})
    state.update(
        status="done",
        ended=_now(),
        outputs=outputs,
        metrics={**state["metrics"], **metrics, "seconds": round(time.monotonic() - t0, 2)},
    )
    write_json_atomic(path, state)
    return state


def run_recipe(
    recipe: Recipe, echo: Callable[[str], None], *, force: bool = False, only: str | None = None
) -> list[dict[str, Any]]:
    """Run what is not done; return the states of the stages that ran."""
    run_dir = recipe.run_dir
    ran: list[dict[str, Any]] = []
    if (
        recipe.get("launch.machine_rank") > 0
        and only not in STAGE_NAMES[: STAGE_NAMES.index("train")]
    ):
        only = "train"  # multi-node: machine 0 saves, compares and reports
        echo(
            f"machine {recipe.get('launch.machine_rank')}: runs the stages up to train; "
            "machine 0 writes the adapter and the reports"
        )
    claim_run_dir(run_dir)  # before the lock file: it would be the first thing written there
    with run_lock(run_dir), sigterm_as_interrupt():
        check_ownership(recipe, force)
        write_resolved_recipe(recipe)
        ctx = Context(recipe=recipe, run_dir=run_dir, echo=echo)
        plan = compute_plan(recipe)
        train = plan[STAGE_NAMES.index("train")]
        if train.status != "done" and only not in STAGE_NAMES[: STAGE_NAMES.index("train")]:
            refuse_abandoning(recipe, train)  # on_changed_settings = "refuse": before any work
        reran: set[str] = set()
        for st in plan:
            if only and STAGE_NAMES.index(st.name) > STAGE_NAMES.index(only):
                break
            upstream_ran = [u for u in st.stage.upstream if u in reran]
            if st.status == "done" and not upstream_ran:
                echo(f"{st.name}: skipped (up to date)")
                continue
            reasons = (
                st.reasons
                if st.status != "done"
                else [f"upstream re-ran: {', '.join(upstream_ran)}"]
            )
            ctx.log(f"{st.name}: running ({'; '.join(reasons)})")
            try:
                state = run_stage(ctx, st)
            except StageError:
                rest = [s.name for s in plan[plan.index(st) + 1 :]]
                if rest:
                    echo(f"skipped after the failure: {', '.join(rest)}")
                raise
            ctx.log(f"{st.name}: done in {state['metrics']['seconds']} s")
            ran.append(state)
            reran.add(st.name)
    return ran

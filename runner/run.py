"""Execute a plan: run each stage that is not up to date, record its state, say why."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import importlib
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.context import Context
from runner.errors import Interrupted, RecipeError, StageError
from runner.plan import STAGE_NAMES, StageStatus, compute_plan
from runner.quiet import quiet_libraries
from runner.recipe import Recipe
from runner.rundir import (
    LOCK,
    RESOLVED_RECIPE,
    check_ownership,
    claim_run_dir,
    error_log,
    new_state,
    run_lock,
    settings_note,
    state_path,
    write_settings,
)
from runner.state import is_disk_full, path_size, write_json_atomic, write_text_atomic
from runner.training.attempts import refuse_abandoning


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_resolved_recipe(recipe: Recipe) -> None:
    """What this run uses: the resolved recipe to read, its --set/--unset for the commands that
    follow this run directory (plan, status, generate, chat, export)."""
    write_text_atomic(recipe.run_dir / RESOLVED_RECIPE, recipe.to_toml())
    write_settings(recipe)


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


def _record_line(ctx: Context, line: str) -> None:
    """A line the CLI prints itself (a failure) also goes to logs/run.log; best effort."""
    with contextlib.suppress(OSError):
        ctx.record(line)


def _keep_traceback(ctx: Context, stage: str, reason: str) -> Path | None:
    """The traceback of an unexpected error, for the person who reports it; best effort."""
    path = error_log(ctx.run_dir, stage)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{_now()} {stage}: {reason}\n{traceback.format_exc()}", encoding="utf-8")
    except OSError:
        return None
    return path


def wants_traceback(flag: bool = False) -> bool:
    """`recipe run --traceback` or RECIPE_TRACEBACK=1: unexpected errors are re-raised."""
    return flag or os.environ.get("RECIPE_TRACEBACK", "").lower() in ("1", "true", "yes")


def run_stage(ctx: Context, st: StageStatus, *, reraise: bool = False) -> dict[str, Any]:
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
    with contextlib.suppress(OSError):  # an earlier failure's traceback would mislead
        error_log(ctx.run_dir, st.name).unlink()

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
    except (RecipeError, StageError) as e:
        reason = e.message if isinstance(e, StageError) else "; ".join(e.lines)
        state.update(status="failed", ended=_now(), error=reason)
        _record_end(path, state)
        raise
    except Exception as e:
        if is_disk_full(e):
            reason = (
                f"disk full while writing {getattr(e, 'filename', None) or ctx.run_dir}; "
                "free space and run again (finished stages are kept)"
            )
            state.update(status="failed", ended=_now(), error=reason)
            _record_end(path, state)
            raise StageError(st.name, reason) from e
        reason = (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]
        log = _keep_traceback(ctx, st.name, reason)
        where = f"traceback in {log}" if log else "rerun with --traceback to see where it happened"
        state.update(status="failed", ended=_now(), error=reason)
        _record_end(path, state)
        if wants_traceback(reraise):
            _record_line(ctx, f"error: stage {st.name} failed: {reason} ({where})")
            raise
        raise StageError(st.name, f"{reason} ({where})") from e
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
        outputs.append({"path": rel, "size": path_size(ctx.run_dir / rel)})
    state.update(
        status="done",
        ended=_now(),
        outputs=outputs,
        metrics={**state["metrics"], **metrics, "seconds": round(time.monotonic() - t0, 2)},
    )
    write_json_atomic(path, state)
    return state


def _unwritable(run_dir: Path) -> str | None:
    """Why the run directory cannot be written (read-only, not ours), or None."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        os.close(os.open(run_dir / LOCK, flags, 0o644))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return e.strerror or type(e).__name__
        raise
    return None


def _read_only_run(
    recipe: Recipe, echo: Callable[[str], None], only: str | None, why: str
) -> list[dict[str, Any]]:
    """A finished run in a folder we may not write (a shared, read-only copy): report it;
    anything left to do cannot be done there, so say which folder and what to do."""
    plan = compute_plan(recipe)
    wanted = plan if only is None else plan[: STAGE_NAMES.index(only) + 1]
    todo = [st.name for st in wanted if st.status != "done"]
    if todo:
        raise RecipeError(
            f"{recipe.run_dir}: cannot write the run directory ({why}) and "
            f"{', '.join(todo)} must run; make it writable or set recipe.output_dir "
            "(e.g. --set recipe.output_dir=runs/mine) to a folder you can write"
        )
    for st in wanted:
        echo(f"{st.name}: skipped (up to date)")
    echo(f"{recipe.run_dir}: read-only ({why}); every stage is done, nothing to write")
    return []


def run_recipe(
    recipe: Recipe,
    echo: Callable[[str], None],
    *,
    force: bool = False,
    only: str | None = None,
    reraise: bool = False,
) -> list[dict[str, Any]]:
    """Run what is not done; return the states of the stages that ran. `reraise`: unexpected
    errors in a stage propagate with their traceback (after it is logged and recorded)."""
    run_dir = recipe.run_dir
    ran: list[dict[str, Any]] = []
    claim_run_dir(run_dir)  # before the probe below: it would be the first thing written there
    why = _unwritable(run_dir)
    if why is not None:
        return _read_only_run(recipe, echo, only, why)
    if (
        recipe.get("launch.machine_rank") > 0
        and only not in STAGE_NAMES[: STAGE_NAMES.index("train")]
    ):
        only = "train"  # multi-node: machine 0 saves, compares and reports
        echo(
            f"machine {recipe.get('launch.machine_rank')}: runs the stages up to train; "
            "machine 0 writes the adapter and the reports"
        )
    with run_lock(run_dir), sigterm_as_interrupt():
        check_ownership(recipe, force)
        note = settings_note(recipe)
        if note:
            echo(note)
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
                state = run_stage(ctx, st, reraise=reraise)
            except StageError as e:
                rest = [s.name for s in plan[plan.index(st) + 1 :]]
                if rest:
                    ctx.log(f"skipped after the failure: {', '.join(rest)}")
                _record_line(ctx, f"error: stage {e.stage} failed: {e.message}")  # as the CLI
                raise
            except RecipeError as e:
                for line in e.lines:
                    _record_line(ctx, line)
                raise
            ctx.log(f"{st.name}: done in {state['metrics']['seconds']} s")
            ran.append(state)
            reran.add(st.name)
    return ran

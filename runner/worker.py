"""One training process of a launched train stage: `python -m runner.worker SPEC` under
`accelerate launch` (runner.launch starts it; nothing else should).

Every rank loads the recipe the parent ran, its 4-bit model on its own GPU (LOCAL_RANK), and runs
the same training loop as a one-process run (runner.training.loop.train, from the resume
point the parent decided); the Trainer splits the batches. Rank 0 alone
prints, writes logs, state and checkpoints, and writes logs/launch/result.json (metrics, or
`interrupted`, or an error) for the parent. A rank that fails writes
logs/launch/rank-<N>.error.json with a one-line message before it exits, so the parent can say
which rank failed and why; tracebacks go to logs/launch.log only.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from runner.errors import RecipeError, StageError
from runner.rundir import CorruptState, read_state
from runner.state import write_json_atomic


def rank_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def state_progress(state_file: Path) -> Any:
    """Rank 0 records progress (last checkpoint step) in the stage's state file, as the
    one-process run does; the parent re-reads the file before its final write."""

    def progress(metrics: dict[str, Any]) -> None:
        try:
            state = read_state(state_file)
        except CorruptState:
            return
        if state is None:
            return
        state["metrics"] = {**state.get("metrics", {}), **metrics}
        write_json_atomic(state_file, state)

    return progress


def main(spec_path: str) -> int:
    from runner.context import Context
    from runner.errors import Interrupted
    from runner.plan import state_path
    from runner.quiet import quiet_libraries
    from runner.recipe import load_recipe
    from runner.training.loop import ResumePoint, train

    rank, world = rank_info()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    launch_dir = Path(spec_path).parent
    run_dir = Path(spec["run_dir"])

    def echo(message: str) -> None:
        print(message, flush=True)

    try:
        recipe = load_recipe(
            spec["recipe"],
            tuple(spec["overrides"]),
            spec.get("allow", ()),
            tuple(spec.get("unsets", ())),
        )
        quiet_libraries()
        ctx = Context(
            recipe=recipe,
            run_dir=run_dir,
            echo=echo,
            fingerprint=spec["fingerprint"],
            rank=rank,
            world_size=world,
        )
        if ctx.is_main:
            ctx.on_progress = state_progress(state_path(run_dir, "train"))
        resume = ResumePoint(Path(spec["resume"]) if spec["resume"] else None)
        metrics = train(ctx, resume)
    except Interrupted:
        if rank == 0:
            write_json_atomic(launch_dir / "result.json", {"interrupted": ctx.stopped_at_step})
        return 0
    except RecipeError as e:
        report(launch_dir, rank, "\n".join(e.lines), recipe_error=True)
        return 2
    except StageError as e:
        report(launch_dir, rank, e.message)
        return 1
    except Exception as e:
        traceback.print_exc()
        report(launch_dir, rank, f"{type(e).__name__}: {e}".splitlines()[0])
        return 1
    if rank == 0:
        write_json_atomic(launch_dir / "result.json", {"metrics": metrics})
    # No destroy_process_group(): with gloo, a rank tearing down while its peer has already
    # exited can abort (SIGABRT, seen in CI); process exit releases the group.
    return 0


def report(launch_dir: Path, rank: int, message: str, *, recipe_error: bool = False) -> None:
    print(f"rank {rank}: {message}", file=sys.stderr, flush=True)
    write_json_atomic(launch_dir / f"rank-{rank}.error.json", {"rank": rank, "error": message})
    if rank == 0:
        key = "recipe_error" if recipe_error else "error"
        write_json_atomic(launch_dir / "result.json", {key: message})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

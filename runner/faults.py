"""Test-only fault injection: make a `recipe run` die or pause at a precise point of training.

Set RECIPE_FAULT=<point>:<step> in the environment of a `recipe run` (tests/test_faults.py does).
Nothing reads it but this module; leave it unset outside tests.

    after_step:N          SIGKILL itself right after optimizer step N (before checkpoint N is saved)
    during_save:N         SIGKILL itself while checkpoint N is written: its weights are on disk,
                          its optimizer, scheduler, RNG and trainer state are not
    during_state_write:N  SIGKILL itself while the train state that records checkpoint N is
                          written: the temp file is complete, the rename has not happened
    pause_after_step:N    after step N, create <run dir>/.fault-paused and wait (at most
                          PAUSE_LIMIT_S) for SIGINT or SIGTERM, so a test can signal or race it

In a launched (several-process) train, RECIPE_FAULT_RANK=<rank> arms it in that rank only.

SIGKILL to itself is what `kill -9` does: no handler, no `finally`, no flush.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "RECIPE_FAULT"
POINTS = ("after_step", "during_save", "during_state_write", "pause_after_step")
PAUSE_LIMIT_S = 300.0
PAUSED_MARKER = ".fault-paused"

_kill_in_state_write = False


def armed() -> tuple[str, int] | None:
    """(point, step) from RECIPE_FAULT, or None when unset or not understood."""
    point, _, step = os.environ.get(ENV, "").partition(":")
    only = os.environ.get(f"{ENV}_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return None
    if point in POINTS and step.isdigit():
        return point, int(step)
    return None


def die(point: str) -> None:
    sys.stderr.write(f"{ENV}: killed at {point}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is delivered before this returns


def before_state_rename(path: Path) -> None:
    """Called by write_json_atomic between writing the temp file and renaming it."""
    if _kill_in_state_write and path.name == "train.json":
        die(f"during_state_write ({path})")


def trainer_hooks(trainer: Any, run_dir: Path, stopping: Callable[[], bool]) -> list[Any]:
    """Install the armed fault on `trainer`; the callbacks to put before the runner's own."""
    fault = armed()
    if fault is None:
        return []
    from transformers import TrainerCallback

    point, at = fault
    if point == "during_save":  # RunnerTrainer.save_model calls it after the model's files

        def die_when_saved(output_dir: str | None) -> None:
            if output_dir and Path(output_dir).name == f"checkpoint-{at}":
                die(f"during_save:{at}")

        trainer.after_save.append(die_when_saved)
        return []

    class Fault(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step != at:
                return
            if point == "after_step":
                die(f"after_step:{at}")
            elif point == "pause_after_step":
                marker = run_dir / PAUSED_MARKER
                marker.write_text(str(os.getpid()), encoding="utf-8")
                deadline = time.monotonic() + PAUSE_LIMIT_S
                while not stopping() and time.monotonic() < deadline:
                    time.sleep(0.05)
                marker.unlink(missing_ok=True)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            global _kill_in_state_write
            if point == "during_state_write" and state.global_step == at:
                _kill_in_state_write = True

    return [Fault()]

"""Developer knob: profile a few training steps with torch.profiler.

Set RECIPE_PROFILE=<first step>[:<steps>] in the environment of a `recipe run` (bench/gpu.py
--profile does). Every training process records optimizer steps first .. first+steps-1 and
writes <run dir>/logs/profile-rank<R>.json.gz, a Chrome/Perfetto trace that
bench/profile_summary.py reads (GPU busy time, communication, the longest idle gaps and what
the CPU did during them). Nothing else reads the variable; it is not a recipe setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV = "RECIPE_PROFILE"


def window() -> tuple[int, int] | None:
    """(first step, how many) from RECIPE_PROFILE; None when unset or not understood."""
    first, _, steps = os.environ.get(ENV, "").partition(":")
    try:
        return (int(first), int(steps or 1)) if int(first) > 0 else None
    except ValueError:
        return None


def trainer_hooks(log_dir: Path, rank: int) -> list[Any]:
    """A callback that records the asked steps, or nothing when RECIPE_PROFILE is unset."""
    asked = window()
    if asked is None:
        return []
    import torch
    from transformers import TrainerCallback

    first, steps = asked
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    class Profile(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.profiler: Any = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.profiler is None and state.global_step + 1 == first:
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.profiler is None or state.global_step != first + steps - 1:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.stop()
            log_dir.mkdir(parents=True, exist_ok=True)
            # a .gz name: torch writes the trace gzipped
            self.profiler.export_chrome_trace(str(log_dir / f"profile-rank{rank}.json.gz"))
            self.profiler = None

    return [Profile()]

"""What a stage gets: the recipe, its run directory, a logger, and in-process hand-offs.

The hand-offs are typed fields, not a dictionary of names: `model` (quantize-load to train in
the same process) and `stopped_at_step` (an interrupted train stage to the launched worker
that reports it)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.plan import StageStatus
    from runner.recipe.model import Recipe

from runner.rundir import RUN_LOG


@dataclass
class Context:
    recipe: Recipe
    run_dir: Path
    echo: Callable[[str], None]
    fingerprint: str = ""  # of the stage being run
    status: StageStatus | None = None  # what it reads: params, inputs, upstream, libraries
    # quantize-load's model when train runs in the same process (train takes it, then None):
    # loading it twice would double the load time and, on a GPU, the memory
    model: Any = None
    stopped_at_step: int | None = None  # an interrupted train stage's last checkpoint step
    on_progress: Callable[[dict[str, Any]], None] = field(default=lambda metrics: None)
    rank: int = 0  # global rank of a training process started by runner.launch; 0 otherwise
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes state, checkpoints, logs and reports."""
        return self.rank == 0

    def path(self, relative: str) -> Path:
        """A stage output path: fixed by the stage, always inside the run directory."""
        path = self.run_dir / relative
        if ".." in Path(relative).parts or not path.is_relative_to(self.run_dir):
            raise ValueError(f"{relative}: stage outputs stay inside the run directory")
        return path

    def log(self, message: str) -> None:
        """A line on the terminal and in logs/run.log (the main process only)."""
        if not self.is_main:
            return
        self.echo(message)
        self.record(message)

    def record(self, message: str) -> None:
        """A line in logs/run.log only (what the CLI prints itself, e.g. a failure)."""
        log = self.run_dir / RUN_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().isoformat(timespec="seconds")
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")

"""What training shows while it runs: loss, tokens/s and ETA. No torch.

Every logging step becomes a plain line (`train: step 10/120 loss 2.3456 lr 2.00e-03,
1,234 tok/s, ETA 0:01:23`) on stdout and in logs/run.log. On a terminal (stdout and stderr both
TTYs) a rich progress bar with the same figures is drawn below those lines, updated every step;
while it is drawn, lines go through `printer()` so they land above the bar, not inside it.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from typing import Any


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return str(dt.timedelta(seconds=round(seconds)))


class TrainProgress:
    """Fed by the trainer callback: start(), step() every step, logged() every log, stop()."""

    def __init__(
        self,
        log: Callable[[str], None],
        *,
        bar: bool | None = None,
        console: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.clock = clock
        self.bar = sys.stdout.isatty() and sys.stderr.isatty() if bar is None else bar
        self.console = console
        self.total = 0
        self.loss: float | None = None
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0
        self._step = 0
        self._tokens = 0
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int, step: int, tokens: int) -> None:
        """`step` and `tokens` so far: more than 0 when resumed from a checkpoint."""
        self.total, self._t0 = total, self.clock()
        self._step0 = self._step = step
        self._tokens0 = self._tokens = tokens
        if not self.bar:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console or Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task(
            "train", total=total, completed=step, loss="-", speed="-", eta="?"
        )
        self._progress.start()

    def printer(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """`echo`, except while the bar is drawn: then a line printed above the bar."""

        def out(line: str) -> None:
            if self._progress is not None:
                self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                echo(line)

        return out

    def rate(self) -> tuple[float | None, float | None]:
        """Tokens per second and seconds left, from the steps run since start()."""
        elapsed = self.clock() - self._t0
        done = self._step - self._step0
        if elapsed <= 0 or done <= 0:
            return None, None
        tokens_per_s = (self._tokens - self._tokens0) / elapsed
        return tokens_per_s, elapsed / done * max(self.total - self._step, 0)

    def step(self, step: int, tokens: int) -> None:
        self._step, self._tokens = step, tokens
        if self._progress is not None:
            speed, eta = self.rate()
            self._progress.update(
                self._task,
                completed=step,
                speed=f"{speed or 0:,.0f}",
                eta=format_eta(eta),
                loss="-" if self.loss is None else f"{self.loss:.4f}",
            )

    def logged(self, step: int, logs: dict[str, Any]) -> None:
        if "loss" in logs:
            self.loss = float(logs["loss"])
            speed, eta = self.rate()
            figures = f", {speed:,.0f} tok/s, ETA {format_eta(eta)}" if speed is not None else ""
            self.log(
                f"train: step {step}/{self.total} loss {self.loss:.4f} "
                f"lr {logs.get('learning_rate', 0):.2e}{figures}"
            )
        if "eval_loss" in logs:
            self.log(f"train: step {step}/{self.total} eval loss {logs['eval_loss']:.4f}")
        self.step(step, self._tokens)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

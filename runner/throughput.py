"""Throughput and memory of a training run, measured from steady-state steps.

The Trainer's own train_runtime includes start-up (CUDA context, first-step allocation,
compilation); a benchmark wants the steady state, so steps before `warmup` are left out.

Tokens are measured where the collator makes a batch: real tokens and samples from the rows it
was given (before any padding: a packed row's pad segment is neither a token nor a sample),
padded tokens from the batch it returns. They are counted when the Trainer trains on that batch
(`count_when_trained`), not when it is collated: the data loader collates ahead, and counting at
collation credited each step with the next step's batch, so a window that ended with the epoch
came up one batch short (a 4-GPU run of 16 steps over one epoch read 8% low, 2026-11-28).
A batch of a length not seen before makes compiled kernels (flex_attention, compiled layers)
compile again: the step that trains it is left out of the steady state too, as long as that
leaves at least half of the steps after warm-up; a run whose lengths are new at nearly every step
(dynamic padding, packing without pad_to_multiple_of) compiles nothing per length, and all its
steps count.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class Meter:
    """Counts real (non-pad) and padded tokens per batch and times optimizer steps."""

    def __init__(self, pad_id: int | None, warmup: int = 3) -> None:
        self.pad_id = pad_id
        self.warmup = warmup
        self.real = 0
        self.padded = 0
        self.samples = 0
        self.marks: list[tuple[float, int, int, int]] = []  # (time, real, padded, samples)
        self.shapes: set[tuple[int, ...]] = set()
        self.new_shape_steps: set[int] = set()  # intervals (index into marks) with a new shape
        self.paused = False  # while the Trainer evaluates
        self.last_real: int | None = None  # real tokens of the batch training now, if known
        # On CUDA a step ends where an event recorded on the stream says, read at the end: a
        # synchronize per step would leave the GPU idle while the CPU prepares the next one.
        self.events: list[Any] = []
        self.collated: deque[tuple[int, int, int, tuple[int, ...]]] = deque()  # not trained yet

    def count(self, batch: dict[str, Any], features: list[dict[str, Any]] | None = None) -> None:
        """Measure a collated batch; it counts once `trained` says the Trainer took it."""
        ids = batch["input_ids"]
        if features is not None:  # before padding: exact whatever the collator adds
            rows = [len(f["input_ids"]) for f in features]
            real, samples = sum(rows), sum(1 for n in rows if n)
        else:
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(ids.numel())
            if "position_ids" in batch and mask is None:  # packed rows: one per position 0
                samples = int((batch["position_ids"] == 0).sum())
            else:
                samples = int(ids.shape[0])
        self.collated.append((real, int(ids.numel()), samples, tuple(ids.shape)))

    def trained(self) -> None:
        """The Trainer trains on the oldest collated batch: count it in the current step."""
        if not self.collated:  # collated in a data loader worker process: not seen here
            self.last_real = None
            return
        real, padded, samples, shape = self.collated.popleft()
        self.last_real = real
        self.real += real
        self.padded += padded
        self.samples += samples
        if shape not in self.shapes:
            self.shapes.add(shape)
            self.new_shape_steps.add(len(self.marks))

    def step(self) -> None:
        import torch

        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        self.marks.append((time.perf_counter(), self.real, self.padded, self.samples))

    def _stream_times(self) -> None:
        """Step ends as the GPU reached them (CUDA), in place of the CPU's clock."""
        if len(self.events) != len(self.marks) or not self.events:
            return
        self.events[-1].synchronize()
        first = self.events[0]
        start = self.marks[0][0]
        self.marks = [
            (start + first.elapsed_time(event) / 1000, *mark[1:])
            for event, mark in zip(self.events, self.marks, strict=True)
        ]
        self.events = []

    def steady_steps(self, new_shape_steps: set[int] | None = None) -> list[int]:
        """Indices i of the intervals marks[i-1] -> marks[i] that make the steady state.
        `new_shape_steps`: the steps to leave out, when several processes train in lockstep
        (any rank's compilation stalls every rank: the union of theirs)."""
        window = list(range(self.warmup + 1, len(self.marks)))
        left_out = self.new_shape_steps if new_shape_steps is None else new_shape_steps
        warm = [i for i in window if i not in left_out]
        return warm if 2 * len(warm) >= len(window) else window

    def summary(self, new_shape_steps: set[int] | None = None) -> dict[str, Any]:
        self._stream_times()
        out: dict[str, Any] = {}
        steps = self.steady_steps(new_shape_steps) if len(self.marks) > self.warmup + 1 else []
        if steps:
            totals = [0.0, 0, 0, 0]
            for i in steps:
                for k in range(4):
                    totals[k] += self.marks[i][k] - self.marks[i - 1][k]
            dt = max(totals[0], 1e-9)
            out.update(
                steady_steps=len(steps),
                real_tokens_per_second=round(totals[1] / dt, 1),
                padded_tokens_per_second=round(totals[2] / dt, 1),
                samples_per_second=round(totals[3] / dt, 3),
                seconds_per_step=round(dt / len(steps), 4),
                steps_left_out=len(self.marks) - 1 - self.warmup - len(steps),
                batch_shapes=len(self.shapes),
            )
        out.update(memory())
        return out


def memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        import resource

        return {
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        }
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
    }


def counting(collator: Any, meter: Meter) -> Any:
    """Wrap a data collator so every training batch it makes is counted (real tokens from its
    rows). The Trainer collates evaluation batches with the same collator: while `meter.paused`
    (set around evaluation by `pause_during_evaluation`) they are not counted."""

    def collate(features: list[dict[str, Any]]) -> Any:
        batch = collator(features)
        if not meter.paused:
            meter.count(batch, features)
        return batch

    return collate

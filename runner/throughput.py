"""Throughput and memory of a training run, measured from steady-state steps.

The Trainer's own train_runtime includes start-up (CUDA context, first-step allocation,
compilation); a benchmark wants the steady state, so steps before `warmup` are left out.
"""

from __future__ import annotations

import time
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

    def count(self, batch: dict[str, Any]) -> None:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(ids.numel())
        self.real += real
        self.padded += int(ids.numel())
        if "position_ids" in batch and mask is None:  # packed rows: one sample per position 0
            self.samples += int((batch["position_ids"] == 0).sum())
        else:
            self.samples += int(ids.shape[0])

    def step(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), self.real, self.padded, self.samples))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if len(self.marks) > self.warmup + 1:
            t0, r0, p0, s0 = self.marks[self.warmup]
            t1, r1, p1, s1 = self.marks[-1]
            dt = max(t1 - t0, 1e-9)
            out.update(steady_steps=len(self.marks) - 1 - self.warmup,
                       real_tokens_per_second=round((r1 - r0) / dt, 1),
                       padded_tokens_per_second=round((p1 - p0) / dt, 1),
                       samples_per_second=round((s1 - s0) / dt, 3),
                       seconds_per_step=round(dt / (len(self.marks) - 1 - self.warmup), 4))
        out.update(memory())
        return out


def memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        import resource

        return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def counting(collator: Any, meter: Meter) -> Any:
    """Wrap a data collator so every batch it makes is counted."""

    def collate(features: list[dict[str, Any]]) -> Any:
        batch = collator(features)
        meter.count(batch)
        return batch

    return collate

"""Packed rows on several training processes: the same work for every process at every step.

A step of data-parallel training lasts as long as its slowest process. With packing, a process's
work is its row's length: the tokens of the examples it drew. Drawn at random, 32 examples of
the demo data make 4,500-5,700 tokens, and two processes often pad to different 512-token
multiples; the faster one then waits at the gradient all-reduce for a noticeable part of every
step (figures: BENCHMARKS.md, "Measurements behind the code").

`BalancedBatches` draws each step's examples for all processes together, in the random order
the epoch's seed gives (the same on every process, so no communication), and deals them out so
every process gets per_device_train_batch_size examples and nearly the same number of tokens
(longest first, each to the process with the fewest tokens that still has room). Which examples
make a step is unchanged in kind (a random draw of processes x batch examples), so is the
gradient: the Trainer normalizes the loss by the tokens of all processes together.

The batches are yielded step by step, process 0's first, and accelerate's BatchSamplerShard
hands process r every batch whose index is r modulo the number of processes. The epoch is read
from the Trainer's state when an epoch's iteration starts, so a resumed run draws the same
order as an uninterrupted one (accelerate forwards `set_epoch` to a batch sampler only in some
versions).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence


def deal(
    indices: Sequence[int], lengths: Sequence[int], per_process: int, processes: int
) -> list[list[int]]:
    """`indices` split into `processes` lists of `per_process` each, token sums as equal as the
    greedy longest-first rule makes them."""
    batches: list[list[int]] = [[] for _ in range(processes)]
    tokens = [0] * processes
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        room = [p for p in range(processes) if len(batches[p]) < per_process]
        p = min(room, key=lambda p: (tokens[p], p))
        batches[p].append(i)
        tokens[p] += lengths[i]
    return batches


class BalancedBatches:
    """A batch sampler: per step, one batch per process (see the module docstring)."""

    def __init__(
        self,
        lengths: Sequence[int],
        per_process: int,
        processes: int,
        seed: int,
        epoch: Callable[[], float],
    ) -> None:
        self.lengths = list(lengths)
        self.per_process = per_process
        self.processes = processes
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        """A batch per process per step; the last step is filled up from the epoch's first
        examples."""
        return math.ceil(len(self.lengths) / (self.per_process * self.processes)) * self.processes

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed + int(self.epoch() + 1e-6)).shuffle(order)
        size = self.per_process * self.processes
        fill = -len(order) % size
        if order and fill:
            order += (order * math.ceil(fill / len(order)))[:fill]
        for start in range(0, len(order), size):
            yield from deal(
                order[start : start + size], self.lengths, self.per_process, self.processes
            )

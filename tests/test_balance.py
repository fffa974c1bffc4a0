"""Packed rows on several processes: every step's examples dealt out so each process gets the
same number and nearly the same tokens (runner/data/balance.py). No torch."""

from __future__ import annotations

import random

from runner.data.balance import BalancedBatches, deal


def demo_lengths(n: int = 500, seed: int = 1) -> list[int]:
    rnd = random.Random(seed)
    return [max(20, int(rnd.gauss(158, 24))) for _ in range(n)]


def test_deal_gives_each_process_its_count_and_near_equal_tokens() -> None:
    lengths = demo_lengths()
    indices = list(range(64))
    batches = deal(indices, lengths, per_process=16, processes=4)
    assert [len(b) for b in batches] == [16, 16, 16, 16]
    assert sorted(i for b in batches for i in b) == indices
    tokens = [sum(lengths[i] for i in b) for b in batches]
    assert max(tokens) - min(tokens) <= min(lengths[i] for i in indices)


def test_deal_beats_a_random_split() -> None:
    lengths = demo_lengths(4096)
    spread_dealt, spread_random = 0, 0
    for step in range(64):
        indices = list(range(step * 64, step * 64 + 64))
        dealt = [sum(lengths[i] for i in b) for b in deal(indices, lengths, 32, 2)]
        drawn = [sum(lengths[i] for i in indices[:32]), sum(lengths[i] for i in indices[32:])]
        spread_dealt += max(dealt) - min(dealt)
        spread_random += max(drawn) - min(drawn)
    assert spread_dealt * 20 < spread_random


def test_an_epoch_is_every_example_once_then_filled_up_in_process_order() -> None:
    lengths = demo_lengths(50)
    sampler = BalancedBatches(lengths, per_process=4, processes=3, seed=7, epoch=lambda: 0.0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5 * 3  # ceil(50 / 12) steps, a batch per process
    assert all(len(b) == 4 for b in batches)
    seen = [i for b in batches for i in b]
    assert sorted(set(seen)) == list(range(50))
    assert len(seen) - 50 == 10  # the last step is filled up with 10 earlier examples
    for step in range(5):
        tokens = [sum(lengths[i] for i in b) for b in batches[step * 3 : step * 3 + 3]]
        assert max(tokens) - min(tokens) <= max(lengths)


def test_the_order_follows_seed_and_epoch_read_when_iteration_starts() -> None:
    lengths = demo_lengths(40)
    epoch = [0.0]
    sampler = BalancedBatches(lengths, 4, 2, seed=3, epoch=lambda: epoch[0])
    first = list(sampler)
    assert list(sampler) == first
    assert list(BalancedBatches(lengths, 4, 2, seed=3, epoch=lambda: 0.0)) == first
    assert list(BalancedBatches(lengths, 4, 2, seed=4, epoch=lambda: 0.0)) != first
    epoch[0] = 0.99  # the Trainer's state late in epoch 0
    assert list(sampler) == first
    epoch[0] = 1.0
    second = list(sampler)
    assert second != first
    epoch[0] = 1.5  # resumed in the middle of epoch 1: the same order as epoch 1's
    assert list(sampler) == second

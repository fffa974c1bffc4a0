"""Steady-state throughput: warm-up and compile steps left out, also another rank's."""

from __future__ import annotations

from typing import Any

import pytest

from runner.throughput import Meter, counting


def meter_with(times: list[float], tokens_per_step: int = 100) -> Meter:
    meter = Meter(pad_id=0, warmup=1)
    t = 0.0
    meter.marks.append((t, 0, 0, 0))
    for i, dt in enumerate(times, start=1):
        t += dt
        meter.marks.append((t, i * tokens_per_step, i * tokens_per_step, i))
    return meter


def test_own_compile_steps_are_left_out() -> None:
    meter = meter_with([9.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0])
    meter.new_shape_steps = {4}
    summary = meter.summary()
    assert summary["steady_steps"] == 5 and summary["steps_left_out"] == 1
    assert summary["real_tokens_per_second"] == 100.0


def test_another_ranks_compile_stall_is_left_out_too() -> None:
    """In lockstep, rank 1 compiling at step 4 makes step 4 slow on rank 0 as well."""
    meter = meter_with([9.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0])
    assert meter.summary()["real_tokens_per_second"] == round(600 / 10.0, 1)  # stall counted
    assert meter.summary({4})["real_tokens_per_second"] == 100.0


def test_a_run_compiling_at_most_steps_keeps_them_all() -> None:
    meter = meter_with([9.0, 2.0, 2.0, 2.0, 2.0])
    summary = meter.summary({2, 3, 4})
    assert summary["steady_steps"] == 4 and summary["real_tokens_per_second"] == 50.0


def bare_trainer(meter: Meter) -> Any:
    """A RunnerTrainer without transformers' __init__: its overrides around stub library
    methods (monkeypatched on transformers.Trainer)."""
    from runner.training.trainer import RunnerTrainer

    trainer = object.__new__(RunnerTrainer)
    trainer.meter = meter
    return trainer


def test_evaluation_batches_are_not_training_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    meter = Meter(pad_id=0)
    collate = counting(lambda rows: {"input_ids": _Ids(len(rows))}, meter)

    def evaluation_loop(self: Any, rows: list[dict[str, list[int]]]) -> str:
        collate(rows)  # the library's loop collates held-out rows with the training collator
        return "metrics"

    monkeypatch.setattr(transformers.Trainer, "evaluation_loop", evaluation_loop)
    trainer = bare_trainer(meter)
    collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert trainer.evaluation_loop([{"input_ids": [1] * 50}]) == "metrics"
    collate([{"input_ids": [6]}])
    meter.trained()
    meter.trained()
    meter.trained()  # nothing left: a no-op
    assert (meter.real, meter.samples, meter.paused) == (6, 3, False)


def test_a_batch_counts_in_the_step_that_trains_it_not_when_collated_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The data loader collates one batch ahead; the last step of the data has nothing left
    to collate and must still count its own batch."""
    import transformers

    meter = Meter(pad_id=0, warmup=0)
    collate = counting(lambda rows: {"input_ids": _Ids(len(rows))}, meter)
    trained: list[int] = []

    def training_step(self: Any, rows: int) -> None:
        trained.append(rows)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    trainer = bare_trainer(meter)
    batches = [[{"input_ids": [1] * 10}] * n for n in (2, 2, 3, 2)]
    collate(batches[0])
    for i, batch in enumerate(batches):
        if i + 1 < len(batches):
            collate(batches[i + 1])  # ahead of the step, as accelerate's loader does
        trainer.training_step(len(batch))
        meter.step()
    assert trained == [2, 2, 3, 2]
    per_step = [b[1] - a[1] for a, b in zip(meter.marks, meter.marks[1:], strict=False)]
    assert per_step == [20, 30, 20]  # steps 2-4: their own batches, the last one included
    assert meter.new_shape_steps == {0, 2}  # (2, 3) first trained in step 1, (3, 3) in step 3


class _Ids:
    """Enough of a tensor for Meter.count: a shape and a numel."""

    def __init__(self, rows: int) -> None:
        self.shape = (rows, 3)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

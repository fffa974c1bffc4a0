"""train: launched (`--gpus N`, [launch]) -> runner/launch.py, which starts the workers; else
in this process: decide where training starts (runner/training/attempts.py), then the training
run (runner/training/loop.py)."""

from __future__ import annotations

from typing import Any

from runner.checkpoints import attempt_dir
from runner.context import Context
from runner.launch import is_launched, run_train


def run(ctx: Context) -> dict[str, Any]:
    import torch

    from runner.training.attempts import start_attempt
    from runner.training.loop import ResumePoint, refuse_impossible_compile, train

    if is_launched(ctx.recipe):
        return run_train(ctx)
    refuse_impossible_compile(ctx.recipe, torch.cuda.is_available())  # before attempt.json
    checkpoint = start_attempt(ctx, attempt_dir(ctx.run_dir, ctx.fingerprint))
    return train(ctx, ResumePoint(checkpoint))

"""bench/quality.py's arms: optimization settings read from the shipped recipes, checkpoints on
equal shares of an epoch (the training itself is the benchmark's, not a test's)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import OPTIMIZATION, arm_settings, optimization, save_steps  # noqa: E402


def test_arms_differ_in_optimization_only_and_train_on_the_cpu() -> None:
    arms = arm_settings(["train.learning_rate=1e-3"])
    adgen, fast = arms["adgen"], arms["adgen-fast"]
    assert (adgen["train.packing"], fast["train.packing"]) == ("false", "true")
    assert fast["model.attn_implementation"] == "sdpa"  # flex_attention has no CPU backward
    assert "model.attn_implementation" not in adgen
    assert fast["train.learning_rate"] == "1e-3"  # --fast-set: this arm only
    assert adgen["train.learning_rate"] == "0.0002"
    assert not any(key.startswith(("dataset.", "model.name", "recipe.")) for key in fast)


def test_other_attention_is_kept_as_the_recipe_sets_it() -> None:
    settings = dict.fromkeys(OPTIMIZATION, 1) | {"train.packing": True}
    settings["model.attn_implementation"] = "eager"
    out = optimization(settings)
    assert out["train.packing"] == "true" and "model.attn_implementation" not in out


def test_checkpoints_fall_on_equal_shares_of_an_epoch() -> None:
    fast = {"train.per_device_train_batch_size": "32", "train.gradient_accumulation_steps": "1"}
    adgen = {"train.per_device_train_batch_size": "1", "train.gradient_accumulation_steps": "4"}
    assert (save_steps(1152, fast, 4), save_steps(1152, adgen, 4)) == (9, 72)
    with pytest.raises(SystemExit, match="not a multiple"):
        save_steps(1000, fast, 4)

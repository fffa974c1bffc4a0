"""gradient_checkpointing / chunked_cross_entropy = "auto" (runner/models/fit.py): the layout a
memory budget buys, priced by `recipe plan --model`'s estimate on a small random GLM (meta
device, no weights read), and the per-layer switch on a real model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from runner.cli import cli  # noqa: E402
from runner.models import fit  # noqa: E402
from tests.test_model_options import make_recipe, write_glm  # noqa: E402

GiB = 2**30
LAYERS = 4


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glm(tmp_path_factory.mktemp("glm") / "model", layers=LAYERS)


@pytest.fixture(autouse=True)
def allow_models(glm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECIPE_ALLOW_PATHS", str(glm.parent))


def plan(tmp_path: Path, glm: Path, budget: float | None, *sets: str, cuda: bool = True) -> Any:
    from runner.models.estimate import Tokens, plan_model

    recipe = make_recipe(tmp_path, glm, *sets)
    tokens = Tokens(1, 4096, 4096, "test", padding_mask=False)
    given = (int(budget), "test budget") if budget is not None else None
    return plan_model(recipe, cuda=cuda, bf16_ok=True, tokens=tokens, budget=given)


def peak(p: Any, checkpointed: int, chunking: str = "off") -> int:
    t = p.tokens
    return int(p.memory.step(t.batch * t.peak_length, t.peak_length, checkpointed, chunking, True))


def test_auto_keeps_as_many_layers_as_the_budget_allows(tmp_path: Path, glm: Path) -> None:
    probe = plan(tmp_path, glm, None, "train.chunked_cross_entropy=false")
    every, none = peak(probe, LAYERS), peak(probe, 0)
    assert every < none
    for budget, expected in ((2 * none, 0), (every / 2, LAYERS)):
        p = plan(tmp_path, glm, budget, "train.chunked_cross_entropy=false")
        assert p.choice.layout.checkpointed == expected
    # In between: the fewest checkpointed layers whose peak is 10% under the budget.
    budget = (peak(probe, 2) + 1) / (1 - fit.MARGIN)
    p = plan(tmp_path, glm, budget, "train.chunked_cross_entropy=false")
    assert p.choice.layout.checkpointed == 2
    assert p.choice.fits and p.checkpointing
    assert peak(probe, 1) > (1 - fit.MARGIN) * budget
    assert p.choice.describe() == (
        'gradient_checkpointing = "auto": 2 of 4 layers checkpointed, the last 2 keep their '
        f"activations, loss in one pass: estimated peak {peak(probe, 2) / GiB:.1f} GiB of "
        f"{(1 - fit.MARGIN) * budget / GiB:.1f} GiB (test budget, less 10%)"
    )


def test_nothing_fits_says_so(tmp_path: Path, glm: Path) -> None:
    p = plan(tmp_path, glm, 1000, "train.chunked_cross_entropy=false")
    assert not p.choice.fits
    assert p.choice.layout.checkpointed == LAYERS
    assert "nothing fits" in p.choice.describe()
    assert p.choice.describe().endswith(
        "the step may run out of memory (lower per_device_train_batch_size or tokenize.max_length)"
    )


def test_the_loss_is_chunked_only_where_it_buys_layers(
    tmp_path: Path, glm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The small GLM's vocabulary is 96: chunks of 256 tokens make the logits a chunk's."""
    from runner.models import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 96 * 256)
    probe = plan(tmp_path, glm, None)
    # Room for no layer's activations unchunked, but for one more with the logits chunked:
    budget = (peak(probe, 1, "always") + 1) / (1 - fit.MARGIN)
    assert peak(probe, 1) > (1 - fit.MARGIN) * budget
    p = plan(tmp_path, glm, budget)
    assert (p.choice.layout.checkpointed, p.choice.layout.chunking) == (1, "always")
    assert p.choice.auto == ("gradient_checkpointing", "chunked_cross_entropy")
    # A budget that fits everything unchunked: no recompute at all.
    p = plan(tmp_path, glm, 2 * peak(probe, 0))
    assert (p.choice.layout.checkpointed, p.choice.layout.chunking) == (0, "off")


def test_auto_on_the_cpu_and_fixed_settings_checkpoint_as_written(
    tmp_path: Path, glm: Path
) -> None:
    p = plan(tmp_path, glm, 100 * GiB, cuda=False)
    assert p.choice.auto == ()
    assert p.choice.layout.checkpointed == LAYERS  # "auto" off the GPU: every layer
    for setting, expected in (("true", LAYERS), ("false", 0), ("3", 3), ("9", LAYERS)):
        p = plan(tmp_path, glm, 100 * GiB, f"train.gradient_checkpointing={setting}")
        assert p.choice.layout.checkpointed == expected
        assert p.choice.auto == ("chunked_cross_entropy",)


def test_plan_prints_the_choice(tmp_path: Path, glm: Path) -> None:
    recipe = make_recipe(tmp_path, glm, "train.gradient_checkpointing=3")
    args = ["--model", "--set", "train.gradient_checkpointing=3"]
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "recipe.toml"), *args])
    assert result.exit_code == 0, result.output
    assert recipe.get("train.gradient_checkpointing") == 3
    line = next(x for x in result.output.splitlines() if x.startswith("  peak"))
    assert line.endswith(
        "(3 of 4 layers checkpointed, the last 1 keep their activations, loss in one pass; as "
        "the recipe says)"
    )


def test_apply_switches_checkpointing_per_layer(tmp_path: Path, glm: Path) -> None:
    """The first N decoder layers recompute in backward, the others keep their activations;
    the gradients are the same either way."""
    from runner.models.compile import repeated_layers
    from runner.models.load import load_for_training

    def grads(setting: str) -> tuple[list[bool], list[Any]]:
        recipe = make_recipe(
            tmp_path,
            glm,
            f"train.gradient_checkpointing={setting}",
            "quantization.load_in_4bit=false",
            "lora.lora_dropout=0.0",
        )
        model, _ = load_for_training(recipe, glm)
        layout = fit.Layout(fit.fixed_checkpointed(recipe, LAYERS), LAYERS, "off", 0, 0)
        assert fit.apply(model, layout) is None
        flags = [bool(layer.gradient_checkpointing) for layer in repeated_layers(model)]
        model.train()
        ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        return flags, [p.grad for n, p in model.named_parameters() if "lora_A" in n]

    flags, some = grads("3")
    assert flags == [True, True, True, False]
    flags, every = grads("true")
    assert flags == [True] * LAYERS
    assert len(some) == len(every) == 4 * 6
    for a, b in zip(some, every, strict=True):
        torch.testing.assert_close(a, b)


def test_gpu_memory_needs_model(tmp_path: Path, glm: Path) -> None:
    make_recipe(tmp_path, glm)
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "recipe.toml"), "--gpu-memory", "24"])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: --gpu-memory estimates the model's memory: add --model"
    )


def test_plan_for_a_gpu_of_a_given_size(tmp_path: Path, glm: Path) -> None:
    """--gpu-memory plans the CUDA path on a machine without one; the recipe's budget wins."""
    make_recipe(tmp_path, glm)
    recipe = str(tmp_path / "recipe.toml")
    result = CliRunner().invoke(cli, ["plan", recipe, "--model", "--gpu-memory", "24"])
    assert result.exit_code == 0, result.output
    assert "memory estimate (cuda, compute bfloat16" in result.output
    peak = next(x for x in result.output.splitlines() if x.startswith("  peak"))
    assert "(--gpu-memory 24, less 10%)" in peak
    args = ["--model", "--gpu-memory", "24", "--set", "train.memory_budget_gib=8"]
    result = CliRunner().invoke(cli, ["plan", recipe, *args])
    peak = next(x for x in result.output.splitlines() if x.startswith("  peak"))
    assert "(train.memory_budget_gib = 8, less 10%)" in peak

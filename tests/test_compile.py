"""train.torch_compile: how "auto" resolves, what validate refuses, and on the tiny model on the
CPU a compiled run (with the chunked loss too) that trains like the eager one (same losses and
grad norms, step by step) and saves the same adapter names."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from datakit import TEST_TINY, run_env, write_recipe

from runner.errors import RecipeError
from runner.models.compile import compile_wanted
from runner.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_auto_is_on_with_cuda_and_flex_attention_except_under_fsdp(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tokenizer=False)

    def wanted(*sets: str, cuda: bool) -> bool:
        return compile_wanted(load_recipe(path, sets), cuda)

    flex = "model.attn_implementation=flex_attention"
    assert wanted(flex, cuda=True) and not wanted(flex, cuda=False)  # the default is auto
    assert not wanted(cuda=True)  # sdpa: not measured compiled
    fsdp = (
        "launch.strategy=fsdp",
        "quantization.bnb_4bit_quant_storage=bfloat16",
        "train.optim=adamw_torch",
    )
    assert not wanted(flex, *fsdp, cuda=True)
    assert wanted("train.torch_compile=true", cuda=False)
    assert wanted("train.torch_compile=true", cuda=True)
    assert not wanted(flex, "train.torch_compile=false", cuda=True)


def test_fsdp_refuses_torch_compile_true(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tokenizer=False)
    sets = (
        "launch.strategy=fsdp",
        "quantization.bnb_4bit_quant_storage=bfloat16",
        "train.optim=adamw_torch",
        "train.torch_compile=true",
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(path, sets)
    assert "$.train.torch_compile: torch_compile = true is not supported with strategy = " in str(
        e.value
    )


def test_layers_compile_in_place_without_dynamos_ddp_graph_splitting() -> None:
    pytest.importorskip("torch")
    import torch._dynamo

    from runner.models.compile import compile_layers
    from runner.training.trainer import no_ddp_graph_splitting

    class Block(torch.nn.Linear):
        pass

    class Model(torch.nn.Module):
        _no_split_modules = ("Block",)

        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(4, 4), Block(4, 4)])

    # Not monkeypatch.setattr: dynamo's config is a module whose values live outside its
    # __dict__, so pytest would undo the patch by deleting the setting (hiding it from every
    # later test); the config's own patch() restores the value.
    with torch._dynamo.config.patch(optimize_ddp=True):
        model = Model()
        no_ddp_graph_splitting()
        assert compile_layers(model) == (
            "torch_compile: 2 Block layers compiled (the first steps, and the first step of each "
            "new row length, wait for the compiler)"
        )
        assert torch._dynamo.config.optimize_ddp is False
    assert [name for name, _ in model.named_parameters()] == [
        "blocks.0.weight",
        "blocks.0.bias",
        "blocks.1.weight",
        "blocks.1.bias",
    ]


def test_compiling_on_the_cpu_without_a_compiler_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.models import compile as compile_module

    path = write_recipe(tmp_path, tokenizer=False)
    recipe = load_recipe(path, ["train.torch_compile=true"])
    monkeypatch.setenv("CXX", "no-such-cxx")
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    assert compile_module.compile_problem(recipe, cuda=True) is None  # CUDA builds with Triton
    assert compile_module.compile_problem(recipe, cuda=False) == (
        f"{path}: $.train.torch_compile: true needs a C++ compiler on the CPU "
        "(torch.compile builds its kernels with no-such-cxx, not found); install one (e.g. g++) "
        'or set torch_compile = "auto" (off on the CPU)'
    )


# -- the tiny model, compiled on the CPU -------------------------------------------------------

RECIPE = ROOT / "recipes" / "adgen-tiny.toml"
SMALL = (
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.per_device_train_batch_size=4",
    "tokenize.max_length=64",
    "compare.num_examples=0",
    *TEST_TINY,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    pytest.importorskip("torch")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    with run_env(tmp_path_factory) as environment:
        yield environment


def train(run_dir: Path, *sets: str) -> list[tuple[float, float]]:
    from runner.cli import cli

    settings = [a for kv in (*SMALL, *sets) for a in ("--set", kv)]
    args = ["run", str(RECIPE), "--set", f"recipe.output_dir={run_dir}", *settings]
    done = CliRunner().invoke(cli, [*args, "--until", "save"])
    assert done.exit_code == 0, done.output
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    return [(h["loss"], h["grad_norm"]) for h in history if "loss" in h]


@pytest.mark.slow
def test_compiled_layers_and_chunked_loss_train_like_eager(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The fast path (compiled layers, chunked loss) against the plain one, step by step."""
    eager = train(tmp_path / "eager", "train.torch_compile=false")
    compiled = train(
        tmp_path / "compiled", "train.torch_compile=true", "train.chunked_cross_entropy=true"
    )
    assert len(eager) == len(compiled) == 4
    for (loss, norm), (closs, cnorm) in zip(eager, compiled, strict=True):
        assert closs == pytest.approx(loss, rel=1e-4)
        assert cnorm == pytest.approx(norm, rel=1e-3)
    log = (tmp_path / "compiled" / "logs" / "run.log").read_text()
    assert "train: torch_compile: 4 GlmDecoderLayer layers compiled" in log
    assert "train: chunked_cross_entropy: logits and loss" in log
    saved = [
        json.loads((tmp_path / d / "adapter" / "adapter_config.json").read_text())
        for d in ("eager", "compiled")
    ]
    assert saved[0] == saved[1]
    from safetensors import safe_open

    keys = []
    for d in ("eager", "compiled"):
        with safe_open(str(tmp_path / d / "adapter" / "adapter_model.safetensors"), "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])

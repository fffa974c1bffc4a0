"""The model stage's options on the CPU, on a small random GLM written here: every quantization
option loads, trains a step and generates; LoRA targets and keys are resolved and checked; the
hardware-dependent dtype choices; `recipe plan --model` (meta device, no weights read)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from runner.cli import cli  # noqa: E402
from runner.errors import RecipeError  # noqa: E402
from runner.models import load  # noqa: E402
from runner.recipe import load_recipe  # noqa: E402

LINEAR = ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a pinned hub revision


def write_glm(folder: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2) -> Path:
    """A random GlmForCausalLM; its linear shapes suit bitsandbytes' CPU kernel."""
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=64,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    GlmForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glm(tmp_path_factory.mktemp("glm") / "model")


@pytest.fixture(autouse=True)
def allow_models(glm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model folders live outside each test's recipe root: allowed as a person would."""
    monkeypatch.setenv("RECIPE_ALLOW_PATHS", str(glm.parent))


def make_recipe(tmp_path: Path, model: Path, *sets: str) -> Any:
    (tmp_path / "data.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    path = tmp_path / "recipe.toml"
    path.write_text(
        f'[recipe]\nname = "opts"\noutput_dir = "{tmp_path / "run"}"\n'
        f'[model]\nname_or_path = "{model}"\n'
        '[dataset]\npath = "data.jsonl"\nheldout_rows = 0\n'
        '[template]\nprompt = "{{ q }}"\nresponse = "{{ a }}"\n'
        "[compare]\nnum_examples = 0\n",
        encoding="utf-8",
    )
    return load_recipe(path, list(sets))


def train_step(model: Any) -> float:
    """One forward/backward in training mode: a finite loss and a gradient on every LoRA B."""
    model.train()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    return float(out.loss.detach())


def generate(model: Any) -> list[int]:
    """Greedy generation, no grad, eval mode: bitsandbytes' CPU inference path."""
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([[1, 5, 7, 9]]),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0]]


# ------------------------------------------------------------------------ quantization


QUANT_CASES = {
    "nf4-double-quant": (
        [],
        "Linear4bit",
        {"quant_type": "nf4", "double": True, "compute": "float32", "storage": "uint8"},
    ),
    "fp4": (["quantization.bnb_4bit_quant_type=fp4"], "Linear4bit", {"quant_type": "fp4"}),
    "no-double-quant": (
        ["quantization.bnb_4bit_use_double_quant=false"],
        "Linear4bit",
        {"double": False},
    ),
    "compute-bf16": (
        ["quantization.bnb_4bit_compute_dtype=bfloat16"],
        "Linear4bit",
        {"compute": "bfloat16"},
    ),
    "compute-fp16": (
        ["quantization.bnb_4bit_compute_dtype=float16"],
        "Linear4bit",
        {"compute": "float16"},
    ),
    "compute-fp32": (
        ["quantization.bnb_4bit_compute_dtype=float32"],
        "Linear4bit",
        {"compute": "float32"},
    ),
    "storage-bf16": (
        [
            "quantization.bnb_4bit_compute_dtype=bfloat16",
            "quantization.bnb_4bit_quant_storage=bfloat16",
        ],
        "Linear4bit",
        {"storage": "bfloat16"},
    ),
    "storage-fp16": (
        [
            "quantization.bnb_4bit_compute_dtype=float16",
            "quantization.bnb_4bit_quant_storage=float16",
        ],
        "Linear4bit",
        {"storage": "float16"},
    ),
    "storage-fp32": (
        ["quantization.bnb_4bit_quant_storage=float32"],
        "Linear4bit",
        {"storage": "float32"},
    ),
    "8bit": (
        ["quantization.load_in_4bit=false", "quantization.load_in_8bit=true"],
        "Linear8bitLt",
        {},
    ),
    "none": (["quantization.load_in_4bit=false"], "Linear", {}),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantization_option_loads_trains_and_generates_on_cpu(
    tmp_path: Path, glm: Path, case: str
) -> None:
    sets, layer_type, expect = QUANT_CASES[case]
    recipe = make_recipe(tmp_path, glm, "train.gradient_checkpointing=false", *sets)
    model, report = load.load_for_training(recipe, glm)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == layer_type
    assert type(model.base_model.model.lm_head).__name__ == "Linear"  # the head stays unquantized
    if "quant_type" in expect:
        assert q_proj.weight.quant_type == expect["quant_type"]
    if "double" in expect:
        assert bool(q_proj.weight.quant_state.nested) is expect["double"]
    if "compute" in expect:
        assert q_proj.compute_dtype == getattr(torch, expect["compute"])
    if "storage" in expect:
        assert q_proj.weight.dtype == getattr(torch, expect["storage"])
    if case == "none":
        assert q_proj.weight.dtype == torch.float32  # auto compute dtype on the CPU
    assert report["target_modules"] == LINEAR and report["adapted_modules"] == 12
    assert math.isfinite(train_step(model))
    tokens = generate(model)
    assert len(tokens) == 7 and tokens[:4] == [1, 5, 7, 9]


def test_cpu_4bit_kernel_shapes_are_checked_before_training(tmp_path: Path) -> None:
    odd = write_glm(tmp_path / "odd", hidden=64, intermediate=96)  # down_proj: 96 -> 64
    recipe = make_recipe(tmp_path, odd)
    with pytest.raises(RecipeError) as e:
        load.load_for_training(recipe, odd)
    assert e.value.lines == [
        f"{recipe.path}: $.quantization.load_in_4bit: on the CPU, bitsandbytes' 4-bit kernel needs "
        "linear layers with in_features a multiple of 64 and out_features a multiple of 32; "
        "model.layers.0.mlp.down_proj is 96 -> 64: set load_in_4bit = false (plain LoRA) or "
        "load_in_8bit = true, or run on a GPU"
    ]
    model, _ = load.load_for_training(
        make_recipe(
            tmp_path, odd, "quantization.load_in_4bit=false", "quantization.load_in_8bit=true"
        ),
        odd,
    )
    assert len(generate(model)) == 7  # 8-bit has no such limit


def test_compute_dtype_auto_follows_the_hardware(
    tmp_path: Path, glm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = make_recipe(tmp_path, glm)
    assert load.compute_dtype(recipe) == torch.float32  # the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert load.compute_dtype(recipe) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert load.compute_dtype(recipe) == torch.float16
    assert load.hardware() == (True, False)
    fixed = make_recipe(tmp_path, glm, "quantization.bnb_4bit_compute_dtype=float32")
    assert load.compute_dtype(fixed) == torch.float32


def test_dtypes_the_hardware_cannot_run_are_refused(tmp_path: Path, glm: Path) -> None:
    recipe = make_recipe(
        tmp_path, glm, "quantization.bnb_4bit_compute_dtype=bfloat16", "train.bf16=true"
    )
    assert load.precision_problems(recipe, cuda=True, bf16_ok=True) == []
    assert load.precision_problems(recipe, cuda=True, bf16_ok=False) == [
        f"{recipe.path}: $.quantization.bnb_4bit_compute_dtype: this GPU has no bf16 support; "
        'use "float16" or "auto"',
        f"{recipe.path}: $.train.bf16: this GPU has no bf16 support; "
        'set bf16 = "auto" (or fp16 = true)',
    ]
    fp16 = make_recipe(
        tmp_path, glm, "quantization.bnb_4bit_compute_dtype=float16", "train.fp16=true"
    )
    assert load.precision_problems(fp16, cuda=True, bf16_ok=False) == []
    with pytest.raises(RecipeError) as e:
        load.load_for_training(fp16, glm)
    assert e.value.lines == [
        f"{fp16.path}: $.train.fp16: fp16 mixed precision needs a CUDA GPU and none is here; "
        'set fp16 = false (bf16 = "auto" picks for you)'
    ]


# ------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('["q_proj", "v_proj"]', ["q_proj", "v_proj"]),
        ('"all-linear"', LINEAR),
        ('"auto"', LINEAR),  # peft has no mapping for glm: every linear layer
        (
            '["query_key_value", "dense"]',
            ["k_proj", "o_proj", "q_proj", "v_proj"],
        ),  # ChatGLM3 aliases
    ],
)
def test_target_modules_resolve(
    tmp_path: Path, glm: Path, written: str, expected: list[str]
) -> None:
    from runner.models.estimate import meta_model, model_config

    recipe = make_recipe(tmp_path, glm, f"lora.target_modules={written}")
    config, naming, _ = model_config(recipe)
    assert naming == "native"
    assert (
        load.resolve_targets(recipe, meta_model(recipe, config, torch.float32), naming) == expected
    )


def test_unknown_target_module_lists_the_real_ones(tmp_path: Path, glm: Path) -> None:
    recipe = make_recipe(tmp_path, glm, 'lora.target_modules=["q_proj", "gate_proj"]')
    with pytest.raises(RecipeError) as e:
        load.load_for_training(recipe, glm)
    assert e.value.lines == [
        f"{recipe.path}: $.lora.target_modules: 'gate_proj' is not a linear module of glm "
        "(did you mean 'gate_up_proj'?); available: " + ", ".join(LINEAR)
    ]


def test_dora_rslora_modules_to_save_layers_to_transform(tmp_path: Path, glm: Path) -> None:
    sets = (
        "lora.use_dora=true",
        "lora.use_rslora=true",
        'lora.modules_to_save=["lm_head"]',
        "lora.layers_to_transform=[1]",
        "lora.r=4",
        "lora.lora_alpha=8",
        "train.gradient_checkpointing=false",
    )
    model, report = load.load_for_training(make_recipe(tmp_path, glm, *sets), glm)
    names = [n for n, _ in model.named_parameters()]
    adapted = sorted({n.split(".layers.")[1].split(".")[0] for n in names if "lora_A" in n})
    assert adapted == ["1"]  # layers_to_transform
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    head = model.base_model.model.lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"
    assert all(p.requires_grad for p in head.modules_to_save.parameters())
    assert report["adapted_modules"] == 6
    train_step(model)


def test_lora_keys_are_checked_against_the_model(tmp_path: Path, glm: Path) -> None:
    recipe = make_recipe(tmp_path, glm, "lora.layers_to_transform=[0, 2]")
    with pytest.raises(RecipeError) as e:
        load.load_for_training(recipe, glm)
    assert e.value.lines == [
        f"{recipe.path}: $.lora.layers_to_transform: layer 2 does not exist: "
        "glm has 2 layers (0..1)"
    ]
    recipe = make_recipe(tmp_path, glm, 'lora.modules_to_save=["lm_haed"]')
    with pytest.raises(RecipeError) as e:
        load.load_for_training(recipe, glm)
    assert e.value.lines[0].startswith(
        f"{recipe.path}: $.lora.modules_to_save: 'lm_haed' is not a module of glm (did you mean "
        "'lm_head'?); available: down_proj, embed_tokens, gate_up_proj, input_layernorm, k_proj, "
        "lm_head, norm, "
    )


# ------------------------------------------------------------------ plan --model / estimate


def test_estimate_counts_what_the_stage_builds(tmp_path: Path, glm: Path) -> None:
    """Trainable params from the meta model equal the loaded model's; weights within 2%."""
    from runner.models.estimate import plan_model

    for sets in (
        [],
        ["lora.use_dora=true", 'lora.modules_to_save=["lm_head"]'],
        [
            'lora.target_modules=["q_proj"]',
            "lora.r=16",
            "quantization.load_in_4bit=false",
            "quantization.load_in_8bit=true",
        ],
    ):
        recipe = make_recipe(tmp_path, glm, *sets)
        plan = plan_model(recipe)
        model, report = load.load_for_training(recipe, glm)
        assert plan.trainable == report["trainable_params"], sets
        assert plan.targets == report["target_modules"]
        base = model.base_model.model
        loaded = sum(
            t.numel() * t.element_size()
            for t in [*base.parameters(), *base.buffers()]
            if t.untyped_storage().data_ptr()
        )
        for m in base.modules():  # bitsandbytes keeps absmax & co. beside the packed weight
            if not type(m).__module__.startswith("bitsandbytes"):
                continue
            state = getattr(m.weight, "quant_state", None)
            extra = [getattr(m.weight, "SCB", None)]
            if state is not None:
                extra += [state.absmax, state.code]
                if state.nested:
                    extra += [state.state2.absmax, state.state2.code, state.offset]
            loaded += sum(t.numel() * t.element_size() for t in extra if t is not None)
        loaded -= plan.memory.lora  # the LoRA tensors are part of the loaded model
        assert abs(plan.memory.weights - loaded) / loaded < 0.02, (
            sets,
            plan.memory.weights,
            loaded,
        )


def test_activation_estimate_scales_with_tokens_and_checkpointing(
    tmp_path: Path, glm: Path
) -> None:
    from runner.models.estimate import Tokens, plan_model

    recipe = make_recipe(tmp_path, glm)
    small = plan_model(recipe, tokens=Tokens(2, 50, 50, "test", padding_mask=True)).memory
    large = plan_model(recipe, tokens=Tokens(4, 50, 50, "test", padding_mask=True)).memory
    for key in ("checkpointing", "no_checkpointing"):
        assert large.activations[key] == pytest.approx(2 * small.activations[key], rel=1e-6)
    assert small.activations["checkpointing"] < small.activations["no_checkpointing"]
    assert large.peak(True) > small.peak(True)


def test_chunked_loss_caps_the_logits_in_the_estimate(
    tmp_path: Path, glm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.chunked_cross_entropy (auto: on with CUDA): over the one-pass size the logits
    term is one chunk's, whatever the batch; below it, the same as without."""
    from runner.models import chunked_loss
    from runner.models.estimate import Tokens, plan_model

    vocab = json.loads((glm / "config.json").read_text())["vocab_size"]
    assert vocab == 96  # the numbers below are worked out for this vocabulary
    monkeypatch.setattr(chunked_loss, "ONE_PASS_ELEMENTS", vocab * 150)
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", vocab * 50)

    def acts(batch: int, chunked: str) -> int:
        recipe = make_recipe(tmp_path, glm, f"train.chunked_cross_entropy={chunked}")
        tokens = Tokens(batch, 50, 50, "test", padding_mask=True)
        plan = plan_model(recipe, cuda=True, bf16_ok=True, tokens=tokens)
        return int(plan.memory.activations["no_checkpointing"])

    assert acts(2, "true") == acts(2, "false")  # 100 tokens: one pass
    # Worked by hand, per token of the vocabulary of 96: the fp32 log-softmax output, its
    # gradient and the gradient passed on (4 bytes each) = 12 bytes, 1,152 a token.
    # 8 rows of 50 = 400 tokens: plain 400 x 1,152 = 460,800 bytes; chunked one chunk of 50
    # tokens = 57,600; the difference 403,200. 16 rows: 921,600 - 57,600 = 864,000.
    assert acts(8, "false") - acts(8, "true") == 403_200
    assert acts(16, "false") - acts(16, "true") == 864_000
    assert acts(16, "true") - acts(8, "true") == acts(16, "false") - acts(8, "false") - 460_800
    assert acts(8, "auto") == acts(8, "true")  # with CUDA


def sets_of(recipe: Any) -> list[str]:
    return [a for o in recipe.overrides for a in ("--set", o)]


def plan_cli(recipe: Any, *args: str) -> Any:
    return CliRunner().invoke(cli, ["plan", str(recipe.path), "--model", *sets_of(recipe), *args])


def test_plan_model_prints_targets_params_and_memory(tmp_path: Path, glm: Path) -> None:
    recipe = make_recipe(tmp_path, glm, 'lora.target_modules=["q_proj", "v_proj"]', "lora.r=8")
    result = plan_cli(recipe)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"config from {glm}/config.json; no weights read" in out
    assert "LoRA targets: q_proj, v_proj; 4 modules adapted" in out
    # q_proj 64 -> 64 and v_proj 64 -> 32 in 2 layers, r = 8: 2 * (8*64 + 64*8 + 8*64 + 32*8)
    assert "trainable params: 3,584 of " in out
    for part in ("weights", "LoRA params", "gradients", "optimizer state", "activations", "peak"):
        assert f"\n  {part} " in out, part
    assert "tokenize has not run: every row assumed tokenize.max_length = 512 long" in out


def test_plan_model_refuses_a_typo_with_the_real_names(tmp_path: Path, glm: Path) -> None:
    recipe = make_recipe(tmp_path, glm, 'lora.target_modules=["q_prj"]')
    result = plan_cli(recipe)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        f"{recipe.path}: $.lora.target_modules: 'q_prj' is not a linear module of glm "
        "(did you mean 'q_proj'?); available: " + ", ".join(LINEAR)
    )
    assert "Traceback" not in result.output


def test_remote_code_files_are_listed(
    tmp_path: Path, glm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (glm.parent / "remote").mkdir(exist_ok=True)
    remote = glm.parent / "remote"
    for f in glm.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    (remote / "modeling_custom.py").write_text("raise RuntimeError('must not run')\n")
    (remote / "configuration_custom.py").write_text("raise RuntimeError('must not run')\n")
    with pytest.raises(RecipeError) as refused:  # the code is not pinned: the hash to paste
        make_recipe(tmp_path, remote, "model.trust_remote_code=true")
    pin = refused.value.lines[-1].split('code_sha256 = "')[1].split('"')[0]
    recipe = make_recipe(
        tmp_path, remote, "model.trust_remote_code=true", f"model.code_sha256={pin}"
    )
    result = CliRunner().invoke(cli, ["plan", str(recipe.path), *sets_of(recipe)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        f"remote code that would run (trust_remote_code = true): {remote}: "
        "configuration_custom.py, modeling_custom.py"
    )
    hub = make_recipe(
        tmp_path,
        glm,
        "model.name_or_path=someone/model",
        "model.trust_remote_code=true",
        f"model.revision={COMMIT}",
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["plan", str(hub.path), *sets_of(hub)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        f"remote code: cannot list the *.py files of someone/model at revision {COMMIT} "
        "(offline: HF_HUB_OFFLINE is set)"
    )
    off = make_recipe(tmp_path, remote, "model.revision=abc123")  # no remote code: no pin
    assert (
        "remote code" not in CliRunner().invoke(cli, ["plan", str(off.path), *sets_of(off)]).output
    )


def test_plan_model_for_a_tiny_model_not_built_yet(
    small_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """builtin:tiny-glm before its first build: config from [model.tiny], nothing built."""
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(
        cli, ["plan", str(small_recipe), "--model", "--set", "lora.target_modules=all-linear"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "model: glm: 4 layers, hidden 256, vocab 2000, " in result.output
        and "config from [model.tiny] settings (not built yet: the vocabulary is vocab_size 2000; "
        "the trained tokenizer may have fewer); no weights read"
        in result.output
    )
    assert "LoRA targets: " + ", ".join(LINEAR) + "; 24 modules adapted" in result.output
    assert not (tmp_path / "empty-cache").exists()


def test_flex_attention_cannot_train_on_the_cpu() -> None:
    """Refused before any weight is read, with the fix (adgen-fast.toml uses flex)."""
    from pathlib import Path

    import pytest

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU trains flex_attention")
    from runner.errors import RecipeError
    from runner.models.load import load_for_training
    from runner.recipe import load_recipe

    recipe_file = Path(__file__).resolve().parents[1] / "recipes" / "adgen-fast.toml"
    with pytest.raises(RecipeError) as e:
        load_for_training(load_recipe(recipe_file), Path("never-read"))
    assert e.value.lines == [
        f"{recipe_file}: $.model.attn_implementation: flex_attention cannot train on the CPU "
        '(PyTorch has no FlexAttention backward there); use "sdpa" here '
        "(--set model.attn_implementation=sdpa)"
    ]

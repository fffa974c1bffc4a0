"""ChatGLM3 through the model stage: a ChatGLM-format checkpoint (random weights, a SentencePiece
tokenizer.model, remote-code files that raise if imported) is converted once and cached, trained
through the CLI with ChatGLM3 module names, and its adapter exported back to ChatGLM3 names,
exactly. Everything is built here in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
spm = pytest.importorskip("sentencepiece")

from datakit import chatglm_config as tiny_chatglm_config  # noqa: E402

from runner.cli import cli  # noqa: E402
from runner.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHATGLM_NAMES = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
NATIVE = ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]

# Short product blurbs, Chinese and English, for the SentencePiece model and the data rows.
TEXTS = [
    "这款连衣裙采用柔软的棉质面料，穿着舒适透气。",
    "简约的圆领设计，搭配宽松的版型，显得随性自然。",
    "A light linen shirt with a relaxed fit for warm days.",
    "经典的条纹图案，时尚又百搭，适合日常通勤。",
    "Soft cotton trousers, straight cut, with deep side pockets.",
    "高腰的剪裁拉长腿部线条，展现优雅的气质。",
    "The knitted cardigan keeps you warm without feeling heavy.",
    "红色的外套明亮醒目，让人眼前一亮。",
]
ROWS = [
    {"q": f"类型#{k}*颜色#{c}", "a": t}
    for k, c, t in zip(
        ["裙", "衫", "裤", "外套"] * 3,
        ["红色", "蓝色", "白色", "黑色", "灰色", "绿色"] * 2,
        TEXTS + TEXTS[:4],
        strict=True,
    )
]


@pytest.fixture(scope="module")
def chatglm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ChatGLM-format checkpoint folder as THUDM ships one (remote code that must not run)."""
    from chatglm_reference import ChatGLMReference
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("chatglm")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 4 + [r["q"] for r in ROWS]) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "sp"),
        vocab_size=800,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    folder = tmp / "chatglm3-tiny"
    folder.mkdir()
    # up to 800 pieces + 9 ChatGLM3 specials, padded
    cfg = tiny_chatglm_config(padded_vocab_size=832, seq_length=128, rope_ratio=1.0)
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (folder / "tokenizer.model").write_bytes((tmp / "sp.model").read_bytes())
    for code in ("modeling_chatglm.py", "tokenization_chatglm.py", "configuration_chatglm.py"):
        (folder / code).write_text("raise RuntimeError('remote code ran')\n")
    torch.manual_seed(11)
    ref = ChatGLMReference(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(
                torch.rand_like(p) + 0.5
                if name.endswith("layernorm.weight")
                else torch.randn_like(p) * 0.08
            )
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors")
    )
    return folder


@pytest.fixture(autouse=True)
def allow_checkpoint(chatglm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint lives outside each test's recipe root: allowed as a person would."""
    monkeypatch.setenv("RECIPE_ALLOW_PATHS", str(chatglm.parent))


def write_recipe(tmp_path: Path, model: Path, targets: list[str]) -> Path:
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8"
    )
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f"""\
[recipe]
name = "chatglm-tiny"
seed = 3
output_dir = "{tmp_path / "run"}"
[model]
name_or_path = "{model}"
[dataset]
path = "data.jsonl"
heldout_rows = 2
[template]
prompt = "{{{{ q }}}}\\n广告："
response = "{{{{ a }}}}"
[tokenize]
max_length = 64
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.0
target_modules = {json.dumps(targets)}
[train]
per_device_train_batch_size = 2
gradient_accumulation_steps = 1
learning_rate = 1e-2
gradient_checkpointing = false
logging_steps = 1
[compare]
num_examples = 2
max_new_tokens = 4
""",
        encoding="utf-8",
    )
    return recipe


def test_materialize_converts_once_and_caches(
    tmp_path: Path, chatglm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.models import resolve

    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, chatglm, CHATGLM_NAMES))
    said: list[str] = []
    first = resolve.materialize(recipe, said.append)
    second = resolve.materialize(recipe, said.append)
    assert first == second and first.parent == tmp_path / "cache" / "converted"
    assert len([s for s in said if s.startswith("converting ChatGLM checkpoint")]) == 1
    assert resolve.chatglm_source_config(first) == json.loads((chatglm / "config.json").read_text())
    assert json.loads((first / "config.json").read_text())["model_type"] == "glm"
    assert not list(first.glob("*.py"))  # the remote code stays behind
    assert resolve.chatglm_source_config(chatglm) is None


def test_tokenizer_alone_is_converted_without_the_weights(
    tmp_path: Path, chatglm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preparing data for a ChatGLM checkpoint converts its tokenizer only (the weights need not
    be there), into the same files the whole conversion writes."""
    import shutil

    from runner.models import resolve

    cache = tmp_path / "cache"
    monkeypatch.setenv("RECIPE_CACHE", str(cache))
    light = tmp_path / "light"  # the checkpoint without its weights
    shutil.copytree(chatglm, light, ignore=shutil.ignore_patterns("*.safetensors"))
    said: list[str] = []
    alone = resolve.tokenizer_folder(
        load_recipe(write_recipe(tmp_path, light, CHATGLM_NAMES)), said.append
    )
    assert alone.parent == cache / "converted" and said[0].startswith("converting the ChatGLM")
    assert not list(cache.rglob("*.safetensors"))
    done = CliRunner(env={"RECIPE_CACHE": str(cache)}).invoke(
        cli, ["run", str(tmp_path / "recipe.toml"), "--until", "tokenize"]
    )
    assert done.exit_code == 0, done.output
    assert "converting ChatGLM checkpoint" not in done.output
    assert not list(cache.rglob("*.safetensors"))

    whole = resolve.materialize(load_recipe(write_recipe(tmp_path, chatglm, CHATGLM_NAMES)), print)
    names = sorted(p.name for p in alone.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(names)
    for name in names:
        assert (whole / name).read_bytes() == (alone / name).read_bytes(), name
    recipe = load_recipe(write_recipe(tmp_path, chatglm, CHATGLM_NAMES))
    assert resolve.tokenizer_folder(recipe, print) == whole  # converted already: used as it is


@pytest.mark.slow
def test_chatglm_checkpoint_trains_and_exports_to_chatglm_names(
    tmp_path: Path, chatglm: Path
) -> None:
    from chatglm_reference import ChatGLMReference
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import GlmForCausalLM

    from runner.models.chatglm.adapters import convert_adapter_dir

    recipe = write_recipe(tmp_path, chatglm, CHATGLM_NAMES)
    runner = CliRunner(env={"RECIPE_CACHE": str(tmp_path / "cache")})
    done = runner.invoke(cli, ["run", str(recipe), "--set", "train.max_steps=3"])
    assert done.exit_code == 0, done.output
    assert "converting ChatGLM checkpoint" in done.stdout
    run = tmp_path / "run"
    load_report = json.loads((run / "model" / "load.json").read_text())
    assert load_report["module_naming"] == "chatglm"
    assert load_report["target_modules"] == NATIVE
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == NATIVE
    assert json.loads((run / "state" / "train.json").read_text())["metrics"]["global_step"] == 3

    out = tmp_path / "chatglm-adapter"
    exported = runner.invoke(cli, ["export", str(recipe), "--chatglm-adapter", str(out)])
    assert exported.exit_code == 0, exported.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(CHATGLM_NAMES)
    # the base as the export names it: the local folder relative to the export, not absolute
    assert cfg["base_model_name_or_path"] == Path(os.path.relpath(chatglm, out)).as_posix()
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert any(".self_attention.query_key_value.lora_A" in k for k in sd)
    assert not any("q_proj" in k or "gate_up_proj" in k for k in sd)

    # back to native names: every tensor exactly the trained one
    source_cfg = json.loads((chatglm / "config.json").read_text())
    back = convert_adapter_dir(out, tmp_path / "back", to="glm", model_config=source_cfg)
    trained = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    returned = load_file(str(back / "adapter_model.safetensors"))
    assert sorted(returned) == sorted(trained)
    assert all(torch.equal(returned[k], trained[k]) for k in trained)
    assert any(float(v.abs().sum()) > 0 for k, v in trained.items() if "lora_B" in k)

    # and the exported adapter on the original layout computes what the trained one does
    ids = torch.randint(0, 800, (2, 17), generator=torch.Generator().manual_seed(2))
    glm = GlmForCausalLM.from_pretrained(load_report["model_folder"], attn_implementation="eager")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(glm, str(run / "adapter")).eval()(ids).logits
    ref = ChatGLMReference(source_cfg)
    ref.load_state_dict(load_file(str(chatglm / "model.safetensors")))
    keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")
    ref = inject_adapter_in_model(LoraConfig(**{k: cfg[k] for k in keys}), ref)
    set_peft_model_state_dict(ref, {k.removeprefix("base_model.model."): v for k, v in sd.items()})
    with torch.no_grad():
        got = ref.eval()(ids)
    assert float((got - expected).abs().max()) < 1e-4

    # plan --model speaks ChatGLM3 names and refuses native ones for this checkpoint
    shown = runner.invoke(cli, ["plan", str(recipe), "--model"])
    assert shown.exit_code == 0, shown.output
    assert (
        "LoRA targets: query_key_value, dense, dense_h_to_4h, dense_4h_to_h (ChatGLM3 names) -> "
        "down_proj, gate_up_proj, k_proj, o_proj, q_proj, v_proj; 12 modules adapted"
    ) in shown.output
    refused = runner.invoke(
        cli, ["plan", str(recipe), "--model", "--set", 'lora.target_modules=["q_proj", "dense"]']
    )
    assert refused.exit_code == 2
    assert refused.output.splitlines()[-1] == (
        f"{recipe}: $.lora.target_modules: 'q_proj' is not a linear module of ChatGLM3 "
        "(ChatGLM3 calls it 'query_key_value'); available: query_key_value, dense, dense_h_to_4h, "
        "dense_4h_to_h"
    )


def test_export_to_chatglm_names_needs_a_chatglm_model(tmp_path: Path) -> None:
    from runner.errors import RecipeError
    from runner.export import chatglm_config

    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    recipe = write_recipe(tmp_path, Path("builtin:tiny-glm"), ["q_proj"])
    text = recipe.read_text().replace(
        'name_or_path = "builtin:tiny-glm"',
        'name_or_path = "builtin:tiny-glm"\n[model.tiny]\ncorpus = "corpus.jsonl"',
    )
    recipe.write_text(text)
    with pytest.raises(RecipeError) as e:
        chatglm_config(load_recipe(recipe))
    assert e.value.lines == [
        f"{recipe}: $.model.name_or_path: 'builtin:tiny-glm' is not a ChatGLM3 "
        "checkpoint, so its adapter already uses the model's own module names; "
        "export it with --adapter OUT"
    ]


@pytest.mark.parametrize(
    ("written", "chatglm_names", "native"),
    [
        ('"auto"', ["query_key_value"], ["k_proj", "q_proj", "v_proj"]),  # peft's chatglm mapping
        ('"all-linear"', CHATGLM_NAMES, NATIVE),
        ('["dense_h_to_4h", "dense"]', ["dense", "dense_h_to_4h"], ["gate_up_proj", "o_proj"]),
    ],
)
def test_chatglm_targets_in_chatglm_names(
    tmp_path: Path, chatglm: Path, written: str, chatglm_names: list[str], native: list[str]
) -> None:
    from runner.models.estimate import plan_model

    recipe = load_recipe(
        write_recipe(tmp_path, chatglm, ["dense"]), [f"lora.target_modules={written}"]
    )
    plan = plan_model(recipe)
    assert plan.naming == "chatglm"
    assert (plan.targets_as_written, plan.targets) == (chatglm_names, native)


def test_native_names_are_refused_for_a_chatglm_checkpoint(tmp_path: Path, chatglm: Path) -> None:
    from runner.errors import RecipeError
    from runner.models.estimate import plan_model

    recipe = load_recipe(write_recipe(tmp_path, chatglm, ["query_key_value", "gate_up_proj"]))
    with pytest.raises(RecipeError) as e:
        plan_model(recipe)
    assert e.value.lines == [
        f"{recipe.path}: $.lora.target_modules: 'gate_up_proj' is not a linear module of ChatGLM3 "
        "(ChatGLM3 calls it 'dense_h_to_4h'); available: query_key_value, dense, dense_h_to_4h, "
        "dense_4h_to_h"
    ]


class _RunsCode:
    """A pickled object whose loading would create a file: proof of code run by a .bin adapter."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _plant_adapter(adapter: Path, case: str, marker: Path) -> None:
    import pickle

    from safetensors.torch import save_file

    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"]}
    config = "[1, 2]" if case == "config-not-object" else json.dumps(lora)
    (adapter / "adapter_config.json").write_text(config, encoding="utf-8")
    key = "base_model.model.model.layers.0.self_attn.{}_proj.lora_{}.weight"
    if case == "pickle-runs-code":
        (adapter / "adapter_model.bin").write_bytes(pickle.dumps({key: _RunsCode(marker)}))
    elif case == "safetensors-garbage":
        (adapter / "adapter_model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{not json}")
    elif case == "shapes-disagree":  # q's B has 7 rows where the model has 64
        tensors = {
            key.format("q", "A"): torch.zeros(4, 64),
            key.format("q", "B"): torch.zeros(7, 4),
            key.format("k", "A"): torch.zeros(3, 64),
            key.format("k", "B"): torch.zeros(16, 3),
        }
        save_file(tensors, str(adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        (
            "pickle-runs-code",
            "run/adapter/adapter_model.bin: not a state dict that loads without running code "
            "(torch.load weights_only refused it); `recipe run recipe.toml` trains it again",
        ),
        (
            "no-weights",
            "run/adapter: has no adapter_model.safetensors or adapter_model.bin; "
            "`recipe run recipe.toml` trains it again",
        ),
        (
            "config-not-object",
            "run/adapter/adapter_config.json: expected a JSON object, got list; "
            "`recipe run recipe.toml` trains it again",
        ),
        (
            "safetensors-garbage",
            "run/adapter/adapter_model.safetensors: not a readable safetensors file (Error "
            "while deserializing header: invalid header length); `recipe run recipe.toml` trains "
            "it again",
        ),
        (
            "shapes-disagree",
            "run/adapter: cannot write this adapter in ChatGLM3 names: The expanded size of the "
            "tensor (64) must match the existing size (7) at non-singleton dimension 0.  Target "
            "sizes: [64, 4].  Tensor sizes: [7, 4]",
        ),
    ],
)
def test_a_damaged_or_planted_adapter_gets_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, expect: str
) -> None:
    """Someone hands over a project with a run in it: `export --chatglm-adapter` reads that
    adapter folder and must refuse what it cannot convert in one line, running nothing."""
    model = tmp_path / "glm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_chatglm_config()), encoding="utf-8")
    write_recipe(tmp_path, model, CHATGLM_NAMES)
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    _plant_adapter(adapter, case, marker)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["export", "recipe.toml", "--chatglm-adapter", "out"])
    assert (result.exit_code, result.output.splitlines()[-1]) == (2, expect)
    assert "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()

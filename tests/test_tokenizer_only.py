"""Format, tokenize and `recipe inspect` need the tokenizer alone: the embedded tiny model's
tokenizer is built without the model (cached by what determines it, and reused by the full build
so ids never differ), a local folder without weights is enough, and nothing pre-trains."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest
from click.testing import CliRunner
from datakit import CORPUS, make_tokenizer, write_recipe

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from runner.cli import cli
from runner.models import resolve
from runner.recipe import load_recipe

WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
# The smallest tiny model that builds in about a second (the tokenizer is what is compared).
SMALL_TINY = {
    "corpus": "corpus.jsonl",
    "vocab_size": 300,
    "hidden_size": 64,
    "num_layers": 1,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "pretrain_steps": 2,
}


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in WEIGHTS for p in folder.rglob(pattern))


def tiny_recipe(tmp_path: Path) -> Path:
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in CORPUS), encoding="utf-8"
    )
    return write_recipe(
        tmp_path,
        tokenizer=False,
        model={"name_or_path": "builtin:tiny-glm", "tiny": SMALL_TINY},
    )


def test_inspect_builds_the_tiny_tokenizer_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECIPE_CACHE", str(cache))
    recipe = tiny_recipe(tmp_path)
    done = CliRunner().invoke(cli, ["inspect", str(recipe), "-n", "1", "--plain"])
    assert done.exit_code == 0, done.output
    assert "building the embedded tiny model's tokenizer" in done.output
    assert "building the embedded tiny model into" not in done.output
    folder = resolve.tiny_tokenizer_folder(load_recipe(recipe))
    assert f"tokenizer {folder}:" in done.output
    assert not weight_files(cache) and not (cache / "models").exists()
    again = CliRunner().invoke(cli, ["inspect", str(recipe), "-n", "1", "--plain"])
    assert again.exit_code == 0 and "building" not in again.output  # cached


def test_tiny_tokenizer_is_todays_and_the_full_build_uses_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.models.tiny import TOKENIZER_EXTRA, train_tokenizer

    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(tiny_recipe(tmp_path))
    said: list[str] = []
    alone = resolve.tokenizer_folder(recipe, said.append)
    assert alone == resolve.tiny_tokenizer_folder(recipe) and not weight_files(alone)
    # what the builder trained and saved before the tokenizer was built alone
    before = train_tokenizer([*CORPUS, *TOKENIZER_EXTRA], 300, 1024)
    before.save_pretrained(tmp_path / "before")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (alone / name).read_bytes() == (tmp_path / "before" / name).read_bytes(), name

    model = resolve.materialize(recipe, said.append)
    assert model != alone and weight_files(model)
    for f in alone.iterdir():
        assert (model / f.name).read_bytes() == f.read_bytes(), f.name
    assert len([s for s in said if "model's tokenizer into" in s]) == 1  # built once
    assert resolve.tokenizer_folder(recipe, said.append) == model  # the built model's own


def test_tiny_tokenizer_cache_is_keyed_by_what_determines_it(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path)
    first = resolve.tiny_tokenizer_folder(load_recipe(recipe))
    deeper = load_recipe(recipe, ("model.tiny.num_layers=2", "model.tiny.pretrain_steps=9"))
    assert resolve.tiny_tokenizer_folder(deeper) == first  # the model's shape: same tokenizer
    other = load_recipe(recipe, ("model.tiny.vocab_size=400",))
    assert resolve.tiny_tokenizer_folder(other) != first
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "other text"}) + "\n")
    assert resolve.tiny_tokenizer_folder(load_recipe(recipe)) != first


def test_a_local_folder_without_weights_is_enough_to_tokenize_and_inspect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    make_tokenizer(tmp_path / "tok")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "tok" / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path)
    assert resolve.tokenizer_folder(load_recipe(recipe), print) == tmp_path / "tok"
    shown = CliRunner().invoke(cli, ["inspect", str(recipe), "-n", "1", "--plain"])
    assert shown.exit_code == 0, shown.output
    ran = CliRunner().invoke(cli, ["run", str(recipe), "--until", "tokenize"])
    assert ran.exit_code == 0, ran.output
    assert (tmp_path / "run" / "data" / "tokenized").is_dir()
    for made in ("models", "tokenizers", "converted", "random"):  # nothing built or converted
        assert not (tmp_path / "cache" / made).exists()


def test_hub_models_fetch_the_tokenizer_files_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    make_tokenizer(snapshot)
    calls: list[dict[str, object]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    recipe = load_recipe(write_recipe(tmp_path, model={"name_or_path": "owner/model"}))
    assert resolve.tokenizer_folder(recipe, print) == snapshot
    assert calls == [
        {
            "repo_id": "owner/model",
            "revision": "main",
            "allow_patterns": list(resolve.TOKENIZER_PATTERNS),
        }
    ]
    patterns = resolve.TOKENIZER_PATTERNS

    def fetched(name: str) -> bool:
        return any(fnmatch(name, p) for p in patterns)

    assert all(fetched(name) for name in (*resolve.TOKENIZER_FILES, *resolve.TOKENIZER_VOCAB))
    assert fetched("config.json") and fetched("spiece.model")
    for weights in ("model.safetensors", "model-00001-of-00002.safetensors", "pytorch_model.bin"):
        assert not fetched(weights), weights

"""model.tiny.corpus = "train": the embedded tiny model learns its tokenizer and its short
pre-training from the recipe's own formatted training texts (never the held-out rows), and is
keyed by what decides those texts, so other data builds another base and fingerprints follow."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from datakit import write_jsonl, write_recipe

from runner.cli import cli
from runner.models import resolve
from runner.plan import compute_plan
from runner.recipe import load_recipe

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TINY = {
    "corpus": "train",
    "vocab_size": 600,
    "hidden_size": 64,
    "num_layers": 1,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "pretrain_steps": 2,
}
GARDEN = ["garden", "candle", "river", "window", "morning", "yellow"]
HELDOUT_ONLY = "xylophonequartz"


def english_recipe(folder: Path, **tables: dict[str, object]) -> Path:
    train = [
        {"q": f"Describe the {a} near the {b}.", "a": f"The {a} is {b} and quiet in the morning."}
        for a in GARDEN
        for b in GARDEN
    ]
    write_jsonl(folder / "data" / "train.jsonl", train)
    write_jsonl(folder / "data" / "dev.jsonl", [{"q": f"The {HELDOUT_ONLY}?", "a": HELDOUT_ONLY}])
    model = {"name_or_path": "builtin:tiny-glm", "tiny": TINY}
    return write_recipe(folder, tokenizer=False, model=model, **tables)  # type: ignore[arg-type]


def fingerprints(recipe: Path, *overrides: str) -> dict[str, str]:
    return {s.name: s.fingerprint for s in compute_plan(load_recipe(recipe, overrides))}


def test_the_tokenizer_learns_the_training_texts_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(english_recipe(tmp_path))
    texts = resolve.tiny_texts(recipe)
    prompt, response = (
        "Q: Describe the garden near the candle.\nA: ",
        "The garden is candle and quiet in the morning.",
    )
    assert prompt in texts.tokenizer and response in texts.tokenizer  # rendered, as trained
    assert texts.pretrain == [t for t in texts.tokenizer if not t.startswith("Q: ")]
    assert response in texts.pretrain  # pre-trained on responses alone: the mapping is left
    assert not any(HELDOUT_ONLY in t for t in texts.tokenizer)  # to fine-tuning
    tok = AutoTokenizer.from_pretrained(resolve.tokenizer_folder(recipe, print))
    for word in [" Describe", " garden", " candle", " morning", " quiet"]:
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))  # words, not fragments
    assert len(tok.tokenize(" " + HELDOUT_ONLY)) > 3  # the held-out rows were never read
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_the_full_build_learns_the_same_texts_with_the_same_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(english_recipe(tmp_path))
    said: list[str] = []
    alone = resolve.tokenizer_folder(recipe, said.append)
    model = resolve.materialize(recipe, said.append)
    assert (model / "model.safetensors").is_file()
    for f in alone.iterdir():
        assert (model / f.name).read_bytes() == f.read_bytes(), f.name
    texts = len(resolve.tiny_texts(recipe).pretrain)
    assert any(s.startswith("tokenizer: ") and s.endswith(f" from {texts} texts") for s in said)
    facts = next(s for s in said if s.startswith("tiny model built: "))
    assert "'pretrain_steps': 2" in facts


def test_other_training_data_is_another_model_and_re_runs_tokenize_and_quantize_load(
    tmp_path: Path,
) -> None:
    path = english_recipe(tmp_path)
    before = fingerprints(path)
    folder = resolve.builtin_folder(resolve.model_identity(load_recipe(path)))
    tok_folder = resolve.tiny_tokenizer_folder(load_recipe(path))

    # settings that do not change the training texts: the same base
    same = fingerprints(path, "template.format=chat_template", "lora.r=4")
    assert same["tokenize"] != before["tokenize"]  # template.format is tokenize's own param
    assert same["quantize-load"] != before["quantize-load"]  # lora.r is quantize-load's own
    unchanged = load_recipe(path, ("template.format=chat_template", "lora.r=4"))
    assert resolve.builtin_folder(resolve.model_identity(unchanged)) == folder

    for change in (
        lambda: write_jsonl(tmp_path / "data" / "train.jsonl", [{"q": "x", "a": "y"}] * 8),
        lambda: path.write_text(path.read_text().replace('"Q: ', '"Question: ')),
    ):
        change()
        now = fingerprints(path)
        assert now["tokenize"] != before["tokenize"]
        assert now["quantize-load"] != before["quantize-load"]  # the base itself changed
        assert resolve.builtin_folder(resolve.model_identity(load_recipe(path))) != folder
        assert resolve.tiny_tokenizer_folder(load_recipe(path)) != tok_folder
    reshuffled = load_recipe(path, ("recipe.seed=7",))  # another held-out choice, other texts
    assert resolve.tiny_tokenizer_folder(reshuffled) != resolve.tiny_tokenizer_folder(
        load_recipe(path)
    )


def test_train_is_not_a_file_even_in_a_parent_recipe(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    parent = english_recipe(shared)
    child = tmp_path / "child.toml"
    child.write_text(
        f'extends = "shared/{parent.name}"\n[recipe]\nname = "child"\n'
        f'output_dir = "{tmp_path / "run"}"\n',
        encoding="utf-8",
    )
    recipe = load_recipe(child)
    assert recipe.get("model.tiny.corpus") == "train"  # not rebased to shared/train
    assert recipe.get("dataset.path") == "./shared/data"
    assert "The garden is candle and quiet in the morning." in resolve.tiny_texts(recipe).pretrain


def test_inspect_on_the_training_texts_builds_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    recipe = english_recipe(tmp_path)
    done = CliRunner().invoke(cli, ["inspect", str(recipe), "-n", "1", "--plain"])
    assert done.exit_code == 0, done.output
    assert "building the embedded tiny model's tokenizer" in done.output
    assert not (tmp_path / "cache" / "models").exists()

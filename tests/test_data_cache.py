"""The format/tokenize cache: each input that changes the data re-runs exactly the stages that
read it and says which one changed; a crash mid-tokenize leaves nothing a later run trusts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from datakit import make_tokenizer, mark_done, write_jsonl, write_recipe

from runner.cli import cli
from runner.plan import compute_plan
from runner.recipe import load_recipe
from runner.state import path_size, sha256_file


def stale(recipe_file: Path, overrides: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The stages that are not done, with their reasons."""
    plan = compute_plan(load_recipe(recipe_file, overrides))
    return {st.name: st.reasons for st in plan if st.status != "done"}


DOWNSTREAM = {
    "train": ["upstream changed: tokenize"],
    "save": ["upstream changed: train"],
    "compare": ["upstream changed: save, tokenize"],
}


@pytest.fixture
def done(tmp_path: Path) -> Path:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "response.j2").write_text("{{ a }}", encoding="utf-8")
    recipe = write_recipe(
        tmp_path, template={"response": None, "response_file": "templates/response.j2"}
    )
    mark_done(recipe)
    assert stale(recipe) == {}
    return recipe


def test_changed_data_file(done: Path) -> None:
    with open(done.parent / "data" / "train.jsonl", "a", encoding="utf-8") as f:
        f.write('{"q": "new", "a": "row"}\n')
    assert stale(done) == {
        "format": ["changed inputs: dataset.files.data/train.jsonl"],
        "tokenize": ["upstream changed: format"],
        **DOWNSTREAM,
    }


def test_changed_template_file(done: Path) -> None:
    (done.parent / "templates" / "response.j2").write_text("{{ a }}!", encoding="utf-8")
    assert stale(done) == {
        "format": ["changed inputs: templates.templates/response.j2"],
        "tokenize": ["upstream changed: format"],
        **DOWNSTREAM,
    }


def test_changed_inline_template(done: Path) -> None:
    assert stale(done, ("template.prompt=Question: {{ q }}",)) == {
        "format": ["changed params: template.prompt 'Q: {{ q }}\\nA: ' -> 'Question: {{ q }}'"],
        "tokenize": ["upstream changed: format"],
        **DOWNSTREAM,
    }


def test_changed_tokenizer_file_reruns_tokenize_only(done: Path) -> None:
    make_tokenizer(done.parent / "tok", pad_is_eos=True)  # rewrites tokenizer_config.json
    assert stale(done) == {
        "tokenize": ["changed inputs: tokenizer.files.tokenizer_config.json"],
        **DOWNSTREAM,
    }


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("tokenize.max_length=32", "changed params: tokenize.max_length 64 -> 32"),
        ("tokenize.truncation=drop", "changed params: tokenize.truncation 'cut_prompt' -> 'drop'"),
        ("tokenize.train_on_prompt=true", "changed params: tokenize.train_on_prompt False -> True"),
        (
            "template.format=chat_template",
            "changed params: template.format 'plain' -> 'chat_template'",
        ),
    ],
)
def test_changed_tokenize_setting_reruns_tokenize_only(
    done: Path, setting: str, reason: str
) -> None:
    assert stale(done, (setting,)) == {"tokenize": [reason], **DOWNSTREAM}


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("dataset.shuffle=false", "changed params: dataset.shuffle True -> False"),
        ("dataset.flatten=true", "changed params: dataset.flatten False -> True"),
        ("template.empty=error", "changed params: template.empty 'drop' -> 'error'"),
        ("recipe.seed=2", "changed params: recipe.seed 1 -> 2"),
    ],
)
def test_changed_format_setting(done: Path, setting: str, reason: str) -> None:
    got = stale(done, (setting,))
    assert got["format"] == [reason] and got["tokenize"] == ["upstream changed: format"]
    assert "quantize-load" not in got


def test_settings_that_change_nothing(done: Path) -> None:
    assert stale(done, ("tokenize.num_proc=4",)) == {}


def test_hub_revision(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, dataset={"path": "someone/qa", "revision": "v1", "heldout_split": "validation"}
    )
    mark_done(recipe)
    got = stale(recipe, ("dataset.revision=v2",))
    assert got["format"] == [
        "changed params: dataset.revision 'v1' -> 'v2'",
        "changed inputs: dataset.revision",
    ]
    assert got["tokenize"] == ["upstream changed: format"] and "quantize-load" not in got


# -- real runs -----------------------------------------------------------------------------------


def run(recipe: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, ["run", str(recipe), "--until", "tokenize", *args])


def tokenized_identity(recipe: Path) -> dict[str, Any]:
    folder = recipe.parent / "run" / "data" / "tokenized"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files} | {
        "size": path_size(folder)
    }


def test_crash_mid_tokenize_leaves_no_trusted_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runner.data.tokenization as tokenize

    write_jsonl(
        tmp_path / "data" / "train.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(3000)]
    )
    write_jsonl(tmp_path / "data" / "dev.jsonl", [{"q": "q", "a": "a"}])
    recipe = write_recipe(tmp_path)
    assert run(recipe).exit_code == 0
    before = tokenized_identity(recipe)
    calls = {"n": 0}
    real = tokenize.fit

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1500:  # in the second batch of datasets.map
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "fit", failing)
    result = run(recipe, "--set", "tokenize.max_length=32")
    assert result.exit_code == 1
    assert "error: stage tokenize failed: RuntimeError: disk on fire" in result.output
    assert tokenized_identity(recipe) == before  # the old folder, untouched
    plan = {
        st.name: (st.status, st.reasons)
        for st in compute_plan(load_recipe(recipe, ("tokenize.max_length=32",)))
    }
    assert plan["tokenize"] == ("pending", ["last run failed"])
    monkeypatch.setattr(tokenize, "fit", real)
    result = run(recipe, "--set", "tokenize.max_length=32")
    assert result.exit_code == 0, result.output
    assert "tokenize: running (last run failed)" in result.output
    assert tokenized_identity(recipe) != before


def test_crash_while_writing_leaves_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasets import DatasetDict

    recipe = write_recipe(tmp_path)
    assert run(recipe).exit_code == 0
    before = tokenized_identity(recipe)
    real_save = DatasetDict.save_to_disk

    def half_save(self: Any, path: str, **kwargs: Any) -> None:
        real_save(self, path, **kwargs)
        (Path(path) / "train" / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise OSError("killed while writing")

    monkeypatch.setattr(DatasetDict, "save_to_disk", half_save)
    result = run(recipe, "--set", "tokenize.max_length=32")
    assert result.exit_code == 1, result.output
    run_dir = tmp_path / "run" / "data"
    assert tokenized_identity(recipe) == before
    assert (run_dir / ".tokenized.tmp").is_dir()  # the half-written folder is only a temp
    monkeypatch.setattr(DatasetDict, "save_to_disk", real_save)
    assert run(recipe, "--set", "tokenize.max_length=32").exit_code == 0
    assert not (run_dir / ".tokenized.tmp").exists()
    state = json.loads((tmp_path / "run" / "state" / "tokenize.json").read_text())
    assert (
        state["status"] == "done"
        and state["outputs"][0]["size"] == tokenized_identity(recipe)["size"]
    )


def test_num_proc_gives_the_same_tokens(tmp_path: Path) -> None:
    from datasets import load_from_disk

    def rows() -> dict[str, Any]:
        data = load_from_disk(str(tmp_path / "run" / "data" / "tokenized"))
        return {split: data[split].to_dict() for split in ("train", "heldout")}

    recipe = write_recipe(tmp_path)
    assert run(recipe).exit_code == 0
    one = rows()
    (tmp_path / "run" / "state" / "tokenize.json").unlink()
    environ = os.environ
    result = run(recipe, "--set", "tokenize.num_proc=2")
    assert result.exit_code == 0, result.output
    assert rows() == one and len(one["train"]["input_ids"]) == 16
    assert os.environ is environ  # not datasets' copy: rich reads the object it saw first


def test_status_shows_the_counts(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenize={"max_length": 8})
    assert run(recipe).exit_code == 0
    out = CliRunner().invoke(cli, ["status", str(recipe)]).output
    lines = [line.strip() for line in out.splitlines()]
    assert "rows: 16 train, 4 held out; 0 dropped for an empty prompt or response" in lines
    train = next(line for line in lines if line.startswith("train: 16 rows, 128 tokens ("))
    assert train.endswith("truncated 16, dropped 0; length min 8 p50 8 p90 8 p99 8 max 8")
    assert (
        "warning: train: 16 of 16 prompts are longer than max_length = 8 tokens: cut from "
        'the left (truncation = "cut_prompt"); raise tokenize.max_length to keep them '
        "whole"
    ) in lines

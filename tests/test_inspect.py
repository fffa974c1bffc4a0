"""`recipe inspect`: rendered examples, a label view that tells trained from masked tokens, and
lint warnings; nothing written into the run directory."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from datakit import RECIPE_ARGV, make_tokenizer, qa_rows, write_jsonl, write_recipe

from runner.cli import cli
from runner.data.lint import tokenize_warnings
from runner.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def inspect(recipe: Path, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["inspect", str(recipe), *args])
    assert result.exit_code == 0, result.output
    return result


def test_plain_label_view(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, dataset={"shuffle": False})
    out = inspect(recipe, "-n", "2").output
    assert "labels: text in [masked]...[/masked] is masked (no loss); the rest is trained" in out
    assert "labels   | [masked]<s>Q: question 0\\nA: [/masked]answer 0</s>" in out
    assert "labels   | [masked]<s>Q: question 1\\nA: [/masked]answer 1</s>" in out
    assert "question 2" not in out
    assert "── example 1 of 2 · train row 1 · " in out
    assert out.rstrip().endswith(
        "lint: 16 of 16 training rows, 4 held-out rows\n  no problems found"
    )
    assert not (tmp_path / "run").exists()  # nothing written into the run dir


def test_train_on_prompt_shows_everything_trained(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, dataset={"shuffle": False}, tokenize={"train_on_prompt": True})
    out = inspect(recipe, "-n", "1").output
    assert "labels   | <s>Q: question 0\\nA: answer 0</s>" in out


def test_lint_warnings(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, dataset={"shuffle": False}, tokenize={"max_length": 12})
    rows = qa_rows(16)
    rows[3]["a"] = ""
    rows[4]["a"] = "the quick brown fox " * 10
    rows[5]["q"] = "the quick brown fox " * 10
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    out = inspect(recipe, "-n", "1").output
    warnings = [line.strip() for line in out.splitlines() if line.startswith("  warning: ")]
    assert warnings == [
        "warning: train: the template produced empty text in 1 rows (0 prompts, 1 responses; "
        'e.g. rows 4): they were dropped (template.empty = "error" refuses them)',
        "warning: train: the end token '</s>' is not trained in 1 of 15 rows (responses cut by "
        "max_length): the model does not learn to stop there",
        "warning: train: 1 of 15 prompts are longer than max_length = 12 tokens: cut from the "
        'left (truncation = "cut_prompt"); raise tokenize.max_length to keep them whole',
        "warning: heldout: 4 of 4 prompts are longer than max_length = 12 tokens: cut from the "
        'left (truncation = "cut_prompt"); raise tokenize.max_length to keep them whole',
    ]


def test_lint_messages_for_masks() -> None:
    cfg = {"max_length": 64, "truncation": "drop"}
    metrics = {
        "tokenizer": {"eos_token": "</s>", "pad_is_eos": True},
        "train": {
            "rows": 10,
            "dropped": 2,
            "truncated": 0,
            "all_masked": 3,
            "no_end_token": 4,
            "eos_masked": 4,
            "prompt_over_max": 1,
        },
    }
    assert tokenize_warnings(metrics, cfg) == [
        "train: every label is masked in 3 of 10 rows: they teach nothing (an empty response, or "
        "one cut off by max_length)",
        "train: pad == eos ('</s>') and the eos is masked in 4 of 10 rows: the model never "
        "learns to stop",
        "train: 2 of 12 rows are longer than max_length = 64 tokens, 1 of them for their prompt "
        'alone: dropped (truncation = "drop")',
    ]


def test_collator_that_masks_pad_equal_to_eos_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The classic bug: labels = input_ids with pad positions masked, while pad == eos."""
    import torch

    import runner.data.collate as collate
    from runner.data.inspection import collator_check

    tok = make_tokenizer(pad_is_eos=True)
    recipe = load_recipe(write_recipe(tmp_path, tokenizer=False))
    rows = [
        {"input_ids": [1, 5, 2], "labels": [-100, 5, 2]},
        {"input_ids": [1, 2], "labels": [-100, 2]},
    ]
    assert collator_check(recipe, tok, rows, eos=2) == []  # the real collator keeps them

    def naive(recipe: Any, tok: Any) -> Any:
        def collate_fn(features: list[dict[str, list[int]]]) -> dict[str, Any]:
            ids = torch.tensor(
                [f["input_ids"] + [tok.pad_token_id] * (3 - len(f["input_ids"])) for f in features]
            )
            return {"input_ids": ids, "labels": ids.masked_fill(ids == tok.pad_token_id, -100)}

        return collate_fn

    monkeypatch.setattr(collate, "make_collator", naive)
    assert collator_check(recipe, tok, rows, eos=2) == [
        "collator: 2 of 2 trained end tokens are masked in a training batch (pad == eos?): the "
        "model never learns to stop"
    ]


def test_chatglm3_label_view(tmp_path: Path) -> None:
    make_tokenizer(tmp_path / "tok", chatglm3=True, padding_side="left")
    recipe = write_recipe(tmp_path, dataset={"shuffle": False}, template={"format": "chatglm3"})
    out = inspect(recipe, "-n", "1").output
    assert (
        "labels   | [masked][gMASK]sop<|user|>\\nQ: question 0\\nA: <|assistant|>[/masked]"
        "\\nanswer 0</s>"
    ) in out
    assert "padding side left" in out


def test_colours_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.data.inspection import inspect_recipe

    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: a terminal, whatever stdout is
    # a colour terminal: under TERM=dumb (CI) rich prints no colour even when forced
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    recipe = load_recipe(write_recipe(tmp_path, dataset={"shuffle": False}))
    inspect_recipe(recipe, n=1, lint_rows=10, plain=False, echo=print)
    out = capsys.readouterr().out
    assert "[masked]" not in out
    trained = re.search(r"\x1b\[([0-9;]+)manswer 0</s>", out)
    masked = re.search(r"\x1b\[([0-9;]+)m<s>Q: question 0", out)
    assert trained and masked and trained.group(1) != masked.group(1), out


def test_inspect_the_shipped_demo_recipe(tmp_path: Path) -> None:
    """On a fresh clone with an empty cache: builds the tiny model's tokenizer alone (no weights,
    no pre-training: seconds), shows the masks."""
    cache = tmp_path / "cache"
    env = dict(os.environ, RECIPE_CACHE=str(cache))
    cmd = [
        *RECIPE_ARGV,
        "inspect",
        str(ROOT / "recipes" / "adgen-tiny.toml"),
        "-n",
        "2",
        "--set",
        f"recipe.output_dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    labels = [line for line in done.stdout.splitlines() if line.startswith("labels   | ")]
    assert len(labels) == 2
    for line in labels:
        assert re.fullmatch(r"labels   \| \[masked\]用户: .*\\n广告: \[/masked\].+</s>", line), line
    assert not (tmp_path / "run").exists()
    assert "building the embedded tiny model's tokenizer" in done.stdout
    assert not [p for p in cache.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    assert not (cache / "models").exists()

"""Using a trained recipe, end to end on the tiny model: report.html, generate, chat, and the
exports. One very short training run (10 steps, 2 compare examples) in its own folder.

The merged export is checked token for token against the SAME de-quantized base with the
adapter unmerged; how often the runner's 4-bit base + adapter agrees with it is printed (run
with -s to see it), not asserted: NF4 rounding changes the base weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from datakit import TEST_TINY, recipe_process, session_cache

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "adgen-tiny.toml"
TOKEN_CHECK_PROMPTS = 8


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], Path, str]]:
    """(the --set overrides, the run dir, the run's stdout); RECIPE_CACHE set for the module."""
    cache = session_cache(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("use") / "run"
    sets = [
        "--set",
        f"recipe.output_dir={run_dir}",
        "--set",
        "train.max_steps=10",
        "--set",
        "compare.num_examples=2",
        *(a for kv in TEST_TINY for a in ("--set", kv)),
    ]
    env = dict(os.environ, RECIPE_CACHE=cache, PYTHONUNBUFFERED="1")
    done = recipe_process("run", str(RECIPE), *sets, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECIPE_CACHE", cache)
        yield sets, run_dir, done.stdout


def recipe_cli(*args: str, stdin: str | None = None) -> Any:
    from runner.cli import cli

    return CliRunner().invoke(cli, list(args), input=stdin)


def compare_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "compare.jsonl").read_text().splitlines()]


def test_compare_writes_the_report_and_prints_its_path(
    short_run: tuple[list[str], Path, str],
) -> None:
    _, run_dir, out = short_run
    report = run_dir / "report.html"
    html = report.read_text(encoding="utf-8")
    assert f"report: {report}" in out
    assert 'src="data:image/png;base64,' in html  # the loss curve of the 10 steps
    rows = compare_rows(run_dir)
    assert len(rows) == 2
    for r in rows:  # the examples are in the page, escaped
        assert r["reference"].replace("&", "&amp;").replace("<", "&lt;") in html
    state = json.loads((run_dir / "state" / "compare.json").read_text())
    assert "report.html" in [o["path"] for o in state["outputs"]]
    assert state["metrics"]["segmentation"] == "jieba"


def test_generate_and_chat_answer_as_compare_did(short_run: tuple[list[str], Path, str]) -> None:
    sets, run_dir, _ = short_run
    rows = compare_rows(run_dir)
    heldout = [
        json.loads(x)
        for x in (ROOT / "data" / "adgen-demo" / "dev.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    by_prompt = {f"用户: {h['content']}\n广告: ": h for h in heldout}
    # the longest prompt of the compare batch is not padded there: same computation as alone
    row = max(rows, key=lambda r: len(r["prompt"]))
    content = by_prompt[row["prompt"]]["content"]
    after = recipe_cli("generate", str(RECIPE), *sets, "--row", json.dumps({"content": content}))
    assert after.exit_code == 0, after.output
    assert after.stdout == row["after"] + "\n"
    assert after.stderr == ""  # the adapter matches the recipe: no staleness note
    raw = recipe_cli("generate", str(RECIPE), *sets, "--prompt", row["prompt"], "--base")
    assert raw.stdout == row["before"] + "\n"
    chat = recipe_cli("chat", str(RECIPE), *sets, stdin=f"{content}\n/quit\n")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout == row["after"] + "\n"
    assert chat.stderr.startswith("chat with the fine-tuned adapter ")


def test_generate_follows_the_runs_settings_and_chat_keeps_the_conversation(
    short_run: tuple[list[str], Path, str],
) -> None:
    _, run_dir, _ = short_run
    row = max(compare_rows(run_dir), key=lambda r: len(r["prompt"]))
    where = f"recipe.output_dir={run_dir}"  # the run directory only: its settings are followed
    after = recipe_cli("generate", str(RECIPE), "--set", where, "--prompt", row["prompt"])
    assert after.exit_code == 0, after.output
    assert after.stdout == row["after"] + "\n"
    assert after.stderr == (
        f"following the last run in {run_dir}: --set train.max_steps=10 "
        "--set compare.num_examples=2 " + " ".join(f"--set {kv}" for kv in TEST_TINY) + "\n"
    )  # and no staleness note: the adapter matches the settings it was trained with
    content = row["prompt"].removeprefix("用户: ").removesuffix("\n广告: ")
    chat = recipe_cli(
        "chat", str(RECIPE), "--set", where, stdin=f"{content}\n好看\n/reset\n{content}\n/exit\n"
    )
    assert chat.exit_code == 0, chat.output
    # the first turn is generate's reply; after /reset the same first turn gives it again
    assert chat.stdout.startswith(row["after"] + "\n")
    assert chat.stdout.endswith("\n" + row["after"] + "\n")
    assert chat.stdout.count("\n") >= 3  # the second turn answered with the first in view
    assert "(conversation reset)" in chat.stderr


def _greedy(model: Any, tok: Any, prompt_ids: list[list[int]], recipe: Any) -> list[list[int]]:
    from runner.models.generate import generate_ids

    return generate_ids(model, tok, prompt_ids, recipe.section("compare"), recipe.seed)


def test_merged_export_reproduces_the_unmerged_adapter_token_for_token(
    short_run: tuple[list[str], Path, str], tmp_path: Path
) -> None:
    import torch
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runner.models.generate import prompt_encoder
    from runner.models.load import load_base, load_tokenizer
    from runner.models.resolve import materialize
    from runner.recipe import load_recipe

    sets, run_dir, _ = short_run
    out = tmp_path / "merged"
    done = recipe_cli("export", str(RECIPE), *sets, "--merge", str(out))
    assert done.exit_code == 0, done.output
    assert done.stderr.startswith("merged model (torch.float32) exported to ")

    recipe = load_recipe(RECIPE, tuple(s for s in sets if s != "--set"))
    folder = materialize(recipe, print)
    tok = load_tokenizer(folder)
    prompts = load_from_disk(str(run_dir / "data" / "formatted"))["heldout"]["prompt"]
    ids = prompt_encoder(recipe, tok).prompt_ids(prompts[:TOKEN_CHECK_PROMPTS])

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert merged.dtype == torch.float32
    assert not any("lora" in k for k in merged.state_dict())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged_ids = _greedy(merged, tok, ids, recipe)
    unmerged = PeftModel.from_pretrained(
        load_base(recipe, folder, quantize=False), str(run_dir / "adapter")
    ).eval()
    assert _greedy(unmerged, tok, ids, recipe) == merged_ids
    assert all(len(x) > 0 for x in merged_ids)

    quantized = PeftModel.from_pretrained(
        load_base(recipe, folder), str(run_dir / "adapter")
    ).eval()
    nf4_ids = _greedy(quantized, tok, ids, recipe)
    same = sum(a == b for a, b in zip(nf4_ids, merged_ids, strict=True))
    prefix = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        / max(len(a), len(b), 1)
        for a, b in zip(nf4_ids, merged_ids, strict=True)
    ]
    print(
        f"\n4-bit base + adapter vs merged: {same}/{len(ids)} generations identical; "
        f"common prefix {100 * sum(prefix) / len(prefix):.0f}% of the tokens on average"
    )


def test_adapter_export_with_a_model_card(
    short_run: tuple[list[str], Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sets, run_dir, _ = short_run
    out = tmp_path / "adapter"
    done = recipe_cli("export", str(RECIPE), *sets, "--adapter", str(out))
    assert done.exit_code == 0, done.output
    card = (out / "README.md").read_text(encoding="utf-8")
    metrics = json.loads((run_dir / "state" / "compare.json").read_text())["metrics"]
    assert card.startswith("---\nlibrary_name: peft\npipeline_tag: text-generation\n")
    # the base as the user knows it, and how to get the built-in one; no cache path anywhere
    assert "- base model: `builtin:tiny-glm`, the recipe runner's built-in tiny GLM" in card
    assert "run `recipe run recipe.toml --until quantize-load` in this folder" in card
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny-glm"
    cache = os.environ["RECIPE_CACHE"]
    for name in ("README.md", "adapter_config.json", "metrics.json", "recipe.toml"):
        text = (out / name).read_text(encoding="utf-8")
        assert cache not in text and str(run_dir) not in text and str(ROOT) not in text, name
    assert "- data: `./inputs/data/adgen-demo`, split `train`, held out `dev[:32]`" in card
    assert "- training: 10 steps, final train loss" in card
    assert f"| rouge-l | {metrics['before']['rouge-l']} | {metrics['after']['rouge-l']} |" in card
    folder = json.loads((run_dir / "model" / "load.json").read_text())["model_folder"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(out))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    again = recipe_cli("export", str(RECIPE), *sets, "--adapter", str(out))
    assert again.exit_code == 2
    # the exported recipe runs again from the export folder: its files are copied there
    monkeypatch.chdir(out)
    checked = recipe_cli("validate", "recipe.toml")
    assert checked.exit_code == 0 and checked.stdout == "recipe.toml: ok\n", checked.output
    planned = recipe_cli("plan", "recipe.toml")
    assert planned.exit_code == 0, planned.output
    assert f"run dir {out.resolve() / 'runs' / 'adgen-tiny'}" in planned.stdout


def test_generation_prompts_are_the_training_prompts(
    short_run: tuple[list[str], Path, str],
) -> None:
    """compare, generate and chat start from the very ids the prompt had in training."""
    from datasets import load_from_disk

    from runner.models.generate import prompt_encoder
    from runner.models.load import load_tokenizer
    from runner.models.resolve import materialize
    from runner.recipe import load_recipe

    sets, run_dir, _ = short_run
    recipe = load_recipe(RECIPE, tuple(s for s in sets if s != "--set"))
    tok = load_tokenizer(materialize(recipe, print))
    formatted = load_from_disk(str(run_dir / "data" / "formatted"))["heldout"]
    tokenized = load_from_disk(str(run_dir / "data" / "tokenized"))["heldout"]
    encoder = prompt_encoder(recipe, tok)
    for i in range(4):
        labels = tokenized[i]["labels"]
        masked = next(j for j, t in enumerate(labels) if t != -100)  # the prompt is masked
        assert encoder.prompt_ids([formatted[i]["prompt"]])[0] == tokenized[i]["input_ids"][:masked]

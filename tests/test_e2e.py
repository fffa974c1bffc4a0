"""End to end on the embedded default (tiny model, demo data, CPU): the spine's promises.

One module-scoped run of recipes/adgen-tiny.toml (50 steps instead of 150) is shared: the first
run (a real `recipe` process), the all-cached second run and a --set lora.r=16 re-run up to
quantize-load in this process (the plan's reasons for the later stages are tests/test_plan.py's;
kill -9 and resume are tests/test_faults.py's, on 6 steps instead of 40).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from datakit import TEST_TINY, recipe_process

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "adgen-tiny.toml"
STAGES = ("format", "tokenize", "quantize-load", "train", "save", "compare")


# The demo's path, shortened: its 150 steps, 120-token replies and pre-trained base are the
# README's figures (bench/cpu.py measures them); 50 steps already move every metric the right way.
SHORTER = ("train.max_steps=50", "compare.max_new_tokens=60", *TEST_TINY)


def run_recipe(run_dir: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    sets = [a for kv in (f"recipe.output_dir={run_dir}", *SHORTER) for a in ("--set", kv)]
    return recipe_process("run", str(RECIPE), *sets, *extra, env=env)


@pytest.fixture(scope="module")
def env(recipe_cache: str) -> dict[str, str]:
    return dict(os.environ, RECIPE_CACHE=recipe_cache, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    done = run_recipe(run_dir, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir, done.stdout


def states(run_dir: Path) -> dict[str, dict]:
    return {s: json.loads((run_dir / "state" / f"{s}.json").read_text()) for s in STAGES}


def test_first_run_completes_every_stage(demo: tuple[Path, str]) -> None:
    run_dir, out = demo
    assert {s["status"] for s in states(run_dir).values()} == {"done"}
    for stage in STAGES:
        assert f"{stage}: running (never ran)" in out
    assert "generations before / after fine-tuning" in out  # the table is printed
    assert (run_dir / "compare.md").read_text().startswith("# Before / after fine-tuning")
    rows = [json.loads(x) for x in (run_dir / "compare.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["before"] != r["after"] for r in rows)


def test_fine_tuned_model_is_closer_to_the_references(demo: tuple[Path, str]) -> None:
    metrics = states(demo[0])["compare"]["metrics"]
    assert metrics["heldout_loss"]["after"] < metrics["heldout_loss"]["before"]
    assert metrics["after"]["rouge-l"] > metrics["before"]["rouge-l"]
    assert metrics["after"]["bleu-4"] > metrics["before"]["bleu-4"]


def test_adapter_loads_with_peft(demo: tuple[Path, str]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = demo[0]
    folder = json.loads((run_dir / "model" / "load.json").read_text())["model_folder"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder), str(run_dir / "adapter")
    )
    assert any("lora_A" in name for name, _ in model.named_parameters())
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "recipe.toml",
        "metrics.json",
        "README.md",
    ):
        assert (run_dir / "adapter" / name).is_file(), name


def test_second_run_skips_everything(demo: tuple[Path, str], recipe_cache: str) -> None:
    """(How fast that is, is bench/cpu.py's figure, not a test's.)"""
    from runner.cli import cli

    run_dir = demo[0]
    sets = [a for kv in (f"recipe.output_dir={run_dir}", *SHORTER) for a in ("--set", kv)]
    again = CliRunner(env={"RECIPE_CACHE": recipe_cache}).invoke(cli, ["run", str(RECIPE), *sets])
    assert again.exit_code == 0, again.output
    for stage in STAGES:
        assert f"{stage}: skipped (up to date)" in again.stdout
    assert "running" not in again.stdout


def test_changed_rank_reruns_from_quantize_load(demo: tuple[Path, str], recipe_cache: str) -> None:
    from runner.cli import cli

    run_dir = demo[0]
    before = states(run_dir)
    loaded = json.loads((run_dir / "model" / "load.json").read_text())
    cli_runner = CliRunner(env={"RECIPE_CACHE": recipe_cache})
    sets = [
        a for kv in (f"recipe.output_dir={run_dir}", *SHORTER, "lora.r=16") for a in ("--set", kv)
    ]
    out = cli_runner.invoke(cli, ["run", str(RECIPE), *sets, "--until", "quantize-load"])
    assert out.exit_code == 0, out.output
    assert "format: skipped (up to date)" in out.output
    assert "tokenize: skipped (up to date)" in out.output
    assert "quantize-load: running (changed params: lora.r 8 -> 16)" in out.output
    after = states(run_dir)
    assert after["format"]["fingerprint"] == before["format"]["fingerprint"]
    assert after["tokenize"]["fingerprint"] == before["tokenize"]["fingerprint"]
    assert after["quantize-load"]["fingerprint"] != before["quantize-load"]["fingerprint"]
    # the model really got rank 16: every LoRA A (r x in) and B (out x r) is twice as big
    reloaded = json.loads((run_dir / "model" / "load.json").read_text())
    assert reloaded["trainable_params"] == 2 * loaded["trainable_params"]
    assert reloaded["adapted_modules"] == loaded["adapted_modules"]
    shown = cli_runner.invoke(cli, ["plan", str(RECIPE), *sets])
    assert shown.exit_code == 0, shown.output
    train = next(x for x in shown.output.splitlines() if x.strip().startswith("train "))
    assert train.split()[1] == "stale" and train.endswith("(upstream changed: quantize-load)")

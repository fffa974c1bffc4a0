"""End to end on the embedded default (tiny model, demo data, CPU): the spine's promises.

One module-scoped run of recipes/adgen-tiny.toml is shared: first run, all-cached second run,
a --set lora.r=16 re-run. The kill -9 test uses its own run directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "adgen-tiny.toml"
STAGES = ("format", "tokenize", "quantize-load", "train", "save", "compare")


def recipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from runner.cli import main; main()", *args]


def run_recipe(run_dir: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = recipe_cmd("run", str(RECIPE), "--set", f"recipe.output_dir={run_dir}", *extra)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = os.environ.get("RECIPE_TEST_CACHE") or str(tmp_path_factory.mktemp("recipe-cache"))
    return dict(os.environ, RECIPE_CACHE=cache, PYTHONUNBUFFERED="1")


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


def test_second_run_skips_everything_quickly(demo: tuple[Path, str], env: dict[str, str]) -> None:
    run_dir = demo[0]
    t0 = time.monotonic()
    again = run_recipe(run_dir, env=env)
    elapsed = time.monotonic() - t0
    assert again.returncode == 0, again.stderr
    for stage in STAGES:
        assert f"{stage}: skipped (up to date)" in again.stdout
    assert "running" not in again.stdout
    assert elapsed < 10, elapsed


def test_changed_rank_reruns_from_quantize_load(
    demo: tuple[Path, str], env: dict[str, str]
) -> None:
    run_dir = demo[0]
    before = states(run_dir)
    out = run_recipe(run_dir, "--set", "lora.r=16", env=env)
    assert out.returncode == 0, out.stderr
    assert "format: skipped (up to date)" in out.stdout
    assert "tokenize: skipped (up to date)" in out.stdout
    assert "quantize-load: running (changed params: lora.r 8 -> 16)" in out.stdout
    assert "train: running (upstream changed: quantize-load)" in out.stdout
    after = states(run_dir)
    assert after["format"]["fingerprint"] == before["format"]["fingerprint"]
    assert after["train"]["fingerprint"] != before["train"]["fingerprint"]
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16


def test_kill_9_during_train_resumes_from_a_checkpoint(tmp_path: Path, env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    args = ("--set", "train.save_steps=5", "--set", "train.max_steps=40")
    cmd = recipe_cmd("run", str(RECIPE), "--set", f"recipe.output_dir={run_dir}", *args)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = run_dir / "state" / "train.json"
    deadline = time.monotonic() + 600
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            step = json.loads(state.read_text()).get("metrics", {}).get("last_checkpoint_step", 0)
        except (OSError, ValueError):
            step = 0
        if step >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["status"] == "running"  # died without a word
    resumed = run_recipe(run_dir, *args, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "train: running (last run did not finish; resumes from checkpoint" in resumed.stdout
    line = next(x for x in resumed.stdout.splitlines() if "train: resumed from checkpoint" in x)
    assert int(line.split("checkpoint ")[1].split()[0]) >= 5
    assert states(run_dir)["train"]["metrics"]["global_step"] == 40

"""The train stage in two processes on the CPU (gloo), through `accelerate launch`, exactly as
`recipe run --gpus 2` starts it on GPUs: the same outputs as a one-process run, the same
numbers for the same global batch, a killed rank that ends the run cleanly and resumes, and
Ctrl-C that checkpoints. Tiny model, 64-token rows, 4 steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from datakit import RECIPE_ARGV, TEST_TINY, run_env

pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "adgen-tiny.toml"
SMALL = (
    "train.max_steps=4",
    "train.save_steps=2",
    "train.logging_steps=1",
    "tokenize.max_length=64",
    "compare.num_examples=1",
    "compare.max_new_tokens=8",
    *TEST_TINY,
)


def args(run_dir: Path, *extra: str, batch: int = 2) -> list[str]:
    settings = (*SMALL, f"train.per_device_train_batch_size={batch}")
    sets = [a for kv in settings for a in ("--set", kv)]
    return ["run", str(RECIPE), "--set", f"recipe.output_dir={run_dir}", *sets, *extra]


def here(run_dir: Path, *extra: str, batch: int = 2) -> Result:
    from runner.cli import cli

    return CliRunner().invoke(cli, args(run_dir, *extra, batch=batch))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with run_env(tmp_path_factory) as environment:
        yield environment


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    done = here(run_dir, "--until", "quantize-load")
    assert done.exit_code == 0, done.output
    return run_dir


def copy(prepared: Path, to: Path) -> Path:
    shutil.copytree(prepared, to)
    return to


@pytest.fixture(scope="module")
def two(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """An uninterrupted 2-process run to the end (save and compare included)."""
    run_dir = copy(prepared, tmp_path_factory.mktemp("two") / "run")
    return run_dir, here(run_dir, "--gpus", "2")


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    return [(h["step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h]


def adapter(run_dir: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_two_processes_produce_what_one_does(two: tuple[Path, Result]) -> None:
    run_dir, done = two
    assert done.exit_code == 0, done.output
    assert (
        f"train: 2 processes (ddp, gloo on the CPU), global batch 2 x 1 x 2 = 4 examples per "
        f"step; worker output: {run_dir / 'logs' / 'launch.log'}"
    ) in done.stdout
    assert "train: step 4/4 loss" in done.stdout  # rank 0 prints, once
    assert done.stdout.count("train: step 4/4 loss") == 1
    for out in (
        "adapter/adapter_model.safetensors",
        "compare.md",
        "compare.jsonl",
        "report.html",
        "train/log_history.json",
        "train/final/adapter_model.safetensors",
    ):
        assert (run_dir / out).is_file(), out
    state = json.loads((run_dir / "state" / "train.json").read_text())
    assert state["status"] == "done"
    metrics = state["metrics"]
    assert metrics["processes"] == 2 and metrics["global_step"] == 4
    assert metrics["last_checkpoint_step"] == 4
    assert len(metrics["peak_rss_gib_per_process"]) == 2  # every rank measured, merged
    (attempt,) = (run_dir / "checkpoints").iterdir()
    assert sorted(p.name for p in (attempt / "checkpoint-2").glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]  # one per rank
    assert not (run_dir / "train" / "stop-requested").exists()
    again = here(run_dir, "--gpus", "2")
    assert again.exit_code == 0, again.output
    assert "train: skipped (up to date)" in again.stdout


def test_two_processes_of_2_train_like_one_process_of_4(
    two: tuple[Path, Result], prepared: Path, tmp_path: Path
) -> None:
    """The same global batch gives the same numbers: the code path is the same, only split."""
    one = copy(prepared, tmp_path / "one")
    done = here(one, "--until", "save", batch=4)
    assert done.exit_code == 0, done.output
    ours, theirs = losses(two[0]), losses(one)
    assert [s for s, _, _ in ours] == [1, 2, 3, 4]
    for (s, loss, grad), (_, loss1, grad1) in zip(ours, theirs, strict=True):
        assert abs(loss - loss1) < 1e-5 and abs(grad - grad1) < 1e-4, (s, loss, loss1, grad, grad1)
    a, b = adapter(two[0]), adapter(one)
    assert a.keys() == b.keys()
    # paged 8-bit AdamW rounds its state blockwise, so a last-bit difference in a gradient
    # (all-reduce vs one sum) can move single elements by part of a step; the adapter as a
    # whole agrees to 0.04% (measured).
    diff = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5  # type: ignore[operator]
    size = sum(float(b[k].norm() ** 2) for k in b) ** 0.5  # type: ignore[attr-defined]
    assert diff / size < 2e-3, diff / size


def start(run_dir: Path, env: dict[str, str], *extra: str, **faults: str) -> subprocess.Popen[str]:
    cmd = [*RECIPE_ARGV, *args(run_dir, "--gpus", "2", "--until", "train", *extra)]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(env, **faults),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


PACKED = ("--set", "train.packing=true")


@pytest.fixture(scope="module")
def packed_two(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """An uninterrupted 2-process run of packed rows."""
    run_dir = copy(prepared, tmp_path_factory.mktemp("packed") / "run")
    return run_dir, here(run_dir, "--gpus", "2", "--until", "train", *PACKED)


def test_packed_rows_are_balanced_and_a_killed_rank_ends_the_run_cleanly_and_resumes(
    packed_two: tuple[Path, Result], prepared: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """A killed rank, once, on packed rows (the harder order to resume; unpacked resumes are
    test_ctrl_c_checkpoints_after_the_step_and_resumes's): every launch costs seconds."""
    done = packed_two[1]
    assert done.exit_code == 0, done.output
    assert (
        "train: packed rows balanced across 2 processes (2 examples each, nearly equal tokens "
        "per step)"
    ) in done.stdout
    run_dir = copy(prepared, tmp_path / "run")
    proc = start(run_dir, env, *PACKED, RECIPE_FAULT="after_step:3", RECIPE_FAULT_RANK="1")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out + err
    log = run_dir / "logs" / "launch.log"
    assert err.strip().splitlines()[-1] == (
        f"error: stage train failed: training process rank 1 was killed by SIGKILL; full log: "
        f"{log}; `recipe run` resumes from checkpoint 2"
    )
    assert "Traceback" not in out + err
    assert json.loads((run_dir / "state" / "train.json").read_text())["status"] == "failed"
    resumed = here(run_dir, "--gpus", "2", "--until", "train", *PACKED)
    assert resumed.exit_code == 0, resumed.output
    assert "train: resumed from checkpoint 2" in resumed.stdout
    assert losses(run_dir) == losses(packed_two[0])  # the same examples after the checkpoint


def test_ctrl_c_checkpoints_after_the_step_and_resumes(
    two: tuple[Path, Result], prepared: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    run_dir = copy(prepared, tmp_path / "run")
    proc = start(run_dir, env, RECIPE_FAULT="pause_after_step:1", RECIPE_FAULT_RANK="0")
    marker = run_dir / ".fault-paused"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()
    os.kill(proc.pid, signal.SIGINT)  # the parent only: the workers are in their own session
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    assert "interrupt: the training processes save a checkpoint after this step" in err
    assert "train: interrupted at step 1; checkpoint saved, `recipe run` resumes" in out
    assert err.strip().splitlines()[-1] == (
        "interrupted during train; state saved, `recipe run` resumes"
    )
    (attempt,) = (run_dir / "checkpoints").iterdir()
    assert (attempt / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "state" / "train.json").read_text())["status"] == "interrupted"
    resumed = here(run_dir, "--gpus", "2", "--until", "train")  # the losses are train's
    assert resumed.exit_code == 0, resumed.output
    assert "train: resumed from checkpoint 1" in resumed.stdout
    assert losses(run_dir) == losses(two[0])


def test_two_machines_on_one_host(prepared: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """Multi-node as documented, with 127.0.0.1 as machine 0: machine 0 trains with machine 1
    and writes the adapter (compare, a stage of machine 0 alone, is left out: every stage costs
    seconds); machine 1 stops after train and its next run has nothing to do."""
    from runner.launch import free_port

    port = free_port()
    common = [
        "--until",
        "save",
        "--gpus",
        "1",
        "--set",
        "launch.num_machines=2",
        "--set",
        "launch.main_process_ip=127.0.0.1",
        "--set",
        f"launch.main_process_port={port}",
    ]
    runs = {rank: copy(prepared, tmp_path / f"machine-{rank}") for rank in (0, 1)}
    procs = {
        rank: subprocess.Popen(
            [
                *RECIPE_ARGV,
                *args(run_dir),
                *common,
                "--set",
                f"launch.machine_rank={rank}",
            ],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank, run_dir in runs.items()
    }
    outs = {rank: proc.communicate(timeout=600) for rank, proc in procs.items()}
    for rank, proc in procs.items():
        assert proc.returncode == 0, outs[rank]
    assert "train: 2 processes on 2 machines (ddp, gloo on the CPU)" in outs[0][0]
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
    assert outs[1][0].startswith(
        "machine 1: runs the stages up to train; machine 0 writes the adapter and the reports\n"
    )
    assert not (runs[1] / "adapter").exists() and not (runs[1] / "train" / "final").exists()
    again = here(runs[1], *common, "--set", "launch.machine_rank=1")
    assert again.exit_code == 0, again.output
    assert "train: skipped (up to date)" in again.stdout


def test_a_launched_run_checks_the_model_on_the_meta_device(prepared: Path, tmp_path: Path) -> None:
    """quantize-load loads no weights in the parent when the workers load their own; its report
    is the one a real load gives."""
    run_dir = copy(prepared, tmp_path / "run")
    done = here(run_dir, "--gpus", "2", "--until", "quantize-load")
    assert done.exit_code == 0, done.output
    assert "quantize-load: running (changed params" not in done.stdout  # --gpus is train's
    (run_dir / "state" / "quantize-load.json").unlink()
    done = here(run_dir, "--gpus", "2", "--until", "quantize-load")
    assert done.exit_code == 0, done.output
    assert "; checked on the meta device, each training process loads its own" in done.stdout
    real = json.loads((prepared / "model" / "load.json").read_text())
    meta = json.loads((run_dir / "model" / "load.json").read_text())
    assert meta["loaded"] == "meta" and "loaded" not in real
    for key in (
        "target_modules",
        "adapted_modules",
        "trainable_params",
        "all_params",
        "trainable_percent",
        "model_type",
        "module_naming",
    ):
        assert meta[key] == real[key], key

"""Fault injection on the train stage (tiny model, CPU): kill it at precise points, resume, and
check the result is the uninterrupted run's; a full disk; a corrupt state file; two runs at once.

Points are hit exactly through the test-only RECIPE_FAULT hook (runner/faults.py), not timers.
Every run starts from one prepared run directory (format, tokenize, quantize-load done) copied
into tmp_path and trains 6 steps of 2 rows (64 tokens) with a checkpoint every 2 steps. The runs
that are killed are real `recipe run` processes; the reference run and the resumes run in this
process through the CLI (click's CliRunner), which saves a torch import per run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from datakit import RECIPE_ARGV, TEST_TINY, run_env

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "adgen-tiny.toml"
SMALL = (
    "train.max_steps=6",
    "train.save_steps=2",
    "train.logging_steps=1",
    "train.per_device_train_batch_size=2",
    "tokenize.max_length=64",
    *TEST_TINY,
)
STEPS = 6
Outcome = tuple[dict[str, Any], list[tuple[int, float, float, float]]]


def args(command: str, run_dir: Path, *extra: str) -> list[str]:
    sets = [a for kv in SMALL for a in ("--set", kv)]
    until = ["--until", "train"] if command == "run" else []
    return [command, str(RECIPE), "--set", f"recipe.output_dir={run_dir}", *sets, *until, *extra]


def here(command: str, run_dir: Path, *extra: str) -> Result:
    """`recipe COMMAND` in this process."""
    from runner.cli import cli

    return CliRunner().invoke(cli, args(command, run_dir, *extra))


def process(run_dir: Path, env: dict[str, str], fault: str) -> tuple[int, int, str]:
    """`recipe run` as a real process with a fault armed: its pid, exit status and stderr."""
    cmd = [*RECIPE_ARGV, *args("run", run_dir)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(env, RECIPE_FAULT=fault),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=600)
    return proc.pid, proc.returncode, err


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import torch

    threads = torch.get_num_threads()
    # One thread everywhere: the same arithmetic in this process and in the killed ones, and on
    # a shared CPU two OpenMP threads per process were ten times slower than one.
    torch.set_num_threads(1)
    with run_env(tmp_path_factory) as environment:
        yield environment
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    done = here("run", run_dir, "--until", "quantize-load")
    assert done.exit_code == 0, done.output
    return run_dir


@pytest.fixture
def fresh(prepared: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    return run_dir


def outcome(run_dir: Path) -> Outcome:
    from safetensors.torch import load_file

    adapter = load_file(str(run_dir / "train" / "final" / "adapter_model.safetensors"))
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    log = [
        (h["step"], h["loss"], h["grad_norm"], h["learning_rate"]) for h in history if "loss" in h
    ]
    return adapter, log


@pytest.fixture(scope="module")
def reference(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Outcome]:
    """The uninterrupted run every fault is compared with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(prepared, run_dir)
    done = here("run", run_dir)
    assert done.exit_code == 0, done.output
    return run_dir, outcome(run_dir)


def assert_same(reference: tuple[Path, Outcome], run_dir: Path, tolerance: float = 1e-6) -> None:
    """Same per-step loss, grad norm and learning rate, same adapter weights."""
    (ref_adapter, ref_log), (adapter, log) = reference[1], outcome(run_dir)
    assert [entry[0] for entry in log] == list(range(1, STEPS + 1))
    assert [entry[0] for entry in ref_log] == list(range(1, STEPS + 1))
    for ours, theirs in zip(log, ref_log, strict=True):
        close = (abs(a - b) <= tolerance for a, b in zip(ours[1:], theirs[1:], strict=True))
        assert all(close), (ours, theirs)
    assert adapter.keys() == ref_adapter.keys()
    worst = max(float((adapter[k] - ref_adapter[k]).abs().max()) for k in adapter)
    assert worst <= tolerance, worst


def resume(reference: tuple[Path, Outcome], run_dir: Path, step: int) -> str:
    resumed = here("run", run_dir)
    assert resumed.exit_code == 0, resumed.output
    ckpt = attempt(run_dir) / f"checkpoint-{step}"
    assert f"train: resumed from checkpoint {step} ({ckpt})" in resumed.stdout
    assert train_state(run_dir)["metrics"]["resumed_from"] == f"checkpoint-{step}"
    assert_same(reference, run_dir)
    return resumed.stdout


def train_state(run_dir: Path) -> dict[str, Any]:
    from runner.rundir import read_state

    state = read_state(run_dir / "state" / "train.json")
    assert state is not None
    return state


def attempt(run_dir: Path) -> Path:
    (folder,) = (run_dir / "checkpoints").iterdir()
    return folder


def plan_line(run_dir: Path) -> str:
    shown = here("plan", run_dir)
    assert shown.exit_code == 0, shown.output
    return next(line for line in shown.stdout.splitlines() if line.split()[0] == "train")


def test_same_seed_same_losses_and_adapter(reference: tuple[Path, Outcome], fresh: Path) -> None:
    done = here("run", fresh)
    assert done.exit_code == 0, done.output
    assert re.search(
        r"^train: step 6/6 loss \d\.\d{4} lr \S+, [\d,]+ tok/s, ETA 0:00:00$",
        done.stdout,
        re.MULTILINE,
    ), done.stdout
    assert_same(reference, fresh, tolerance=0.0)


def test_kill_9_after_a_step_loses_only_the_steps_since_the_checkpoint(
    reference: tuple[Path, Outcome], fresh: Path, env: dict[str, str]
) -> None:
    pid, status, err = process(fresh, env, fault="after_step:3")
    assert status == -signal.SIGKILL, err
    assert "RECIPE_FAULT: killed at after_step:3" in err
    state = train_state(fresh)
    assert state["status"] == "running" and state["metrics"]["last_checkpoint_step"] == 2
    assert (fresh / ".lock").read_text() == str(pid)  # left by the dead process
    assert plan_line(fresh).endswith("(last run did not finish; resumes from checkpoint 2)")
    out = resume(reference, fresh, 2)  # and takes the lock over
    assert "train: running (last run did not finish; resumes from checkpoint 2)" in out


def test_kill_9_during_a_checkpoint_save_falls_back_to_the_previous_one(
    reference: tuple[Path, Outcome], fresh: Path, env: dict[str, str]
) -> None:
    from runner.checkpoints import checkpoint_problem

    _, status, err = process(fresh, env, fault="during_save:4")
    assert status == -signal.SIGKILL, err
    half = attempt(fresh) / "checkpoint-4"
    assert (half / "adapter_model.safetensors").is_file()  # killed mid-save, weights written
    assert checkpoint_problem(half) == "trainer_state.json missing or empty"
    assert train_state(fresh)["metrics"]["last_checkpoint_step"] == 2
    assert plan_line(fresh).endswith("(last run did not finish; resumes from checkpoint 2)")
    out = resume(reference, fresh, 2)
    assert "train: checkpoint 4 skipped: trainer_state.json missing or empty" in out


def test_kill_9_during_the_state_write_leaves_the_previous_state(
    reference: tuple[Path, Outcome], fresh: Path, env: dict[str, str]
) -> None:
    _, status, err = process(fresh, env, fault="during_state_write:4")
    assert status == -signal.SIGKILL, err
    temps = [p.name for p in (fresh / "state").iterdir() if p.name.startswith(".train.json.")]
    assert len(temps) == 1  # written, never renamed
    state = train_state(fresh)  # the previous state, whole
    assert state["status"] == "running" and state["metrics"]["last_checkpoint_step"] == 2
    assert plan_line(fresh).endswith("resumes from checkpoint 4)")  # the state lags the disk
    resume(reference, fresh, 4)


def start_paused(run_dir: Path, env: dict[str, str], step: int) -> subprocess.Popen[str]:
    """A `recipe run` that waits after `step` for a signal."""
    from runner.faults import PAUSED_MARKER

    cmd = [*RECIPE_ARGV, *args("run", run_dir)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env, RECIPE_FAULT=f"pause_after_step:{step}"),
    )
    deadline = time.monotonic() + 300
    while not (run_dir / PAUSED_MARKER).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "never reached the pause"
        time.sleep(0.1)
    return proc


def assert_interrupted_then_resumed(
    reference: tuple[Path, Outcome], run_dir: Path, proc: subprocess.Popen[str]
) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    assert "interrupt: saving a checkpoint after this step (again to stop at once)" in err
    assert "train: interrupted at step 3; checkpoint saved, `recipe run` resumes" in out
    assert err.endswith("interrupted during train; state saved, `recipe run` resumes\n")
    state = train_state(run_dir)
    assert state["status"] == "interrupted" and state["metrics"]["last_checkpoint_step"] == 3
    out = resume(reference, run_dir, 3)
    assert "train: running (last run interrupted; resumes from checkpoint 3)" in out


def test_ctrl_c_saves_a_checkpoint_and_the_next_run_resumes(
    reference: tuple[Path, Outcome], fresh: Path, env: dict[str, str]
) -> None:
    proc = start_paused(fresh, env, 3)
    os.kill(proc.pid, signal.SIGINT)
    assert_interrupted_then_resumed(reference, fresh, proc)


def test_second_run_is_refused_and_sigterm_stops_the_first(
    reference: tuple[Path, Outcome], fresh: Path, env: dict[str, str]
) -> None:
    proc = start_paused(fresh, env, 3)
    try:
        cmd = [*RECIPE_ARGV, *args("run", fresh)]
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr == (
        f"{fresh}: another `recipe run` (pid {proc.pid}) is using this run "
        f"directory; wait for it to finish; `kill -INT {proc.pid}` stops it "
        "after saving a checkpoint\n"
    )
    assert second.stdout == ""
    assert_interrupted_then_resumed(reference, fresh, proc)


def test_disk_full_during_a_checkpoint_save(
    reference: tuple[Path, Outcome], fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from runner.checkpoints import checkpoint_problem

    real_save = torch.save

    def save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    failed = here("run", fresh)
    assert failed.exit_code == 1, failed.output
    folder = attempt(fresh)
    assert re.fullmatch(
        rf"error: stage train failed: disk full while saving checkpoint 4 to "
        rf"{re.escape(str(folder / 'checkpoint-4'))} \(\d+\.\d MiB free, a checkpoint needs about "
        r"\d+\.\d MiB\); free space and run again \(it resumes from checkpoint 2\)\n",
        failed.stderr,
    ), failed.stderr
    assert not (folder / "checkpoint-4").exists()  # the half-written one is removed
    assert checkpoint_problem(folder / "checkpoint-2") is None  # the previous one is intact
    state = train_state(fresh)
    assert state["status"] == "failed" and state["metrics"]["last_checkpoint_step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    out = resume(reference, fresh, 2)
    assert "train: running (last run failed; resumes from checkpoint 2)" in out


def test_corrupt_state_file_is_named_and_the_stage_runs_again(
    reference: tuple[Path, Outcome], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    path = run_dir / "state" / "train.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # truncated, as a non-atomic writer would leave it
    line = plan_line(run_dir)
    assert line.split()[:2] == ["train", "pending"]
    assert re.search(
        rf"\(corrupt state: {re.escape(str(path))}: not valid JSON \(line \d+\); "
        r"it will be rewritten\)$",
        line,
    ), line
    again = here("run", run_dir)
    assert again.exit_code == 0, again.output
    assert f"train: running (corrupt state: {path}: not valid JSON" in again.stdout
    assert f"train: resumed from checkpoint {STEPS} " in again.stdout  # nothing left to train
    assert train_state(run_dir)["status"] == "done"
    assert_same(reference, run_dir, tolerance=0.0)


def test_changed_setting_starts_a_new_attempt_and_says_why(
    reference: tuple[Path, Outcome], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    old = attempt(run_dir)
    done = here(
        "run", run_dir, "--set", "train.max_steps=3", "--set", "train.on_changed_settings=refuse"
    )  # the old attempt finished: nothing to refuse
    assert done.exit_code == 0, done.output
    assert "train: running (changed params: train.max_steps 6 -> 3)" in done.stdout
    (new,) = [p.name for p in (run_dir / "checkpoints").iterdir() if p != old]
    assert (
        f"train: starting fresh in attempt {new}; attempt {old.name} (finished) was made "
        "with other settings and is not resumed: changed params: train.max_steps 6 -> 3"
    ) in done.stdout
    assert train_state(run_dir)["metrics"]["global_step"] == 3


def test_evaluation_early_stopping_and_tensorboard(fresh: Path) -> None:
    done = here(
        "run",
        fresh,
        "--set",
        "train.eval_steps=1",
        "--set",
        "train.early_stopping_patience=1",
        "--set",
        "train.early_stopping_threshold=100",
        "--set",
        "train.report_to=tensorboard",
    )
    assert done.exit_code == 0, done.output
    assert re.search(r"^train: step 1/6 eval loss \d+\.\d{4}$", done.stdout, re.MULTILINE)
    assert re.search(
        r"^train: stopped early at step 2: the held-out loss did not improve for 1 "
        r"evaluations \(best \d+\.\d{4}\)$",
        done.stdout,
        re.MULTILINE,
    ), done.stdout
    history = json.loads((fresh / "train" / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [1, 2]
    assert train_state(fresh)["metrics"]["global_step"] == 2
    events = list((fresh / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

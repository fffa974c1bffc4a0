"""The train stage in several processes: `accelerate launch` (torchrun underneath) runs
`python -m runner.worker SPEC`, one process per GPU; everything else stays in this process.

What the parent (`recipe run`) does, in order:
- decides the resume point (runner.training.attempts.start_attempt, as a one-process run does),
  so the workers only read checkpoints; each worker runs the training loop
  (runner.training.loop.train) from that point and never this module's code;
- frees the model quantize-load left on GPU 0, writes the spec (recipe file, overrides, the
  train fingerprint and resume point) to logs/launch/spec.json, and starts accelerate in a new
  process session (so a terminal's Ctrl-C reaches only us); rank 0's lines are relayed to our
  stdout, stderr (library warnings, tracebacks, torchrun's reports) goes to logs/launch.log;
- on Ctrl-C / SIGTERM it writes train/stop-requested: the workers agree on it after the current
  step (an all-reduce), save a checkpoint and exit; a second signal kills the process group;
- reads what rank 0 wrote (logs/launch/result.json) or, when a worker died, the per-rank error
  files and torchrun's report, and turns them into one line: which rank, how it ended, where the
  log is, and what the next `recipe run` resumes from.

Imports no torch at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runner.checkpoints import attempt_dir, newest_valid, step_of
from runner.context import Context
from runner.errors import Interrupted, RecipeError, StageError
from runner.recipe import Recipe
from runner.rundir import LAUNCH_DIR, LAUNCH_LOG, STOP_FILE
from runner.state import write_json_atomic
from runner.training.attempts import start_attempt

STOP_GRACE_S = 600.0  # after the first signal, how long the workers get to reach a checkpoint


def processes(recipe: Recipe) -> int:
    """Training processes in all: per machine times machines."""
    return int(recipe.get("launch.num_processes")) * int(recipe.get("launch.num_machines"))


def is_launched(recipe: Recipe) -> bool:
    """Whether the train stage runs through accelerate rather than in this process."""
    return processes(recipe) > 1 or recipe.get("launch.config_file") is not None


def describe_launch(recipe: Recipe, cuda: bool) -> str:
    """`2 processes (ddp, gloo on the CPU), global batch 4 x 2 x 2 = 16 examples per step`."""
    n = processes(recipe)
    cfg = recipe.section("train")
    per, acc = cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"]
    where = "one per GPU" if cuda else "gloo on the CPU"
    machines = recipe.get("launch.num_machines")
    on = f" on {machines} machines" if machines > 1 else ""
    return (
        f"{n} processes{on} ({recipe.get('launch.strategy')}, {where}), global batch "
        f"{per} x {acc} x {n} = {per * acc * n} examples per step"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_command(recipe: Recipe, spec: Path, *, cuda: bool) -> list[str]:
    """`accelerate launch ...` for the recipe's [launch] table (keys written in the recipe
    override a launch.config_file; unwritten ones come from it)."""
    launch = recipe.section("launch")
    written = recipe.written.get("launch", {})
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    config = launch["config_file"]
    if config is not None:
        path = recipe.resolve(config)
        if not path.is_file():
            raise RecipeError(
                f"{recipe.origin('launch.config_file')}: $.launch.config_file: "
                f"{path} does not exist; run `accelerate config --config_file "
                f"{config}` or remove the key"
            )
        cmd += ["--config_file", str(path)]

    def given(key: str) -> bool:
        return config is None or key in written

    if given("num_processes"):
        cmd += ["--num_processes", str(processes(recipe))]
    if given("num_machines"):
        cmd += ["--num_machines", str(launch["num_machines"])]
    if given("machine_rank"):
        cmd += ["--machine_rank", str(launch["machine_rank"])]
    if launch["main_process_ip"] is not None:
        cmd += ["--main_process_ip", launch["main_process_ip"]]
    port = launch["main_process_port"]
    if port is None and config is None:
        port = free_port() if launch["num_machines"] == 1 else 29500
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    if given("strategy"):
        if launch["strategy"] == "fsdp":
            cmd += fsdp_flags(recipe)
        else:
            cmd += ["--multi_gpu"]
    if config is None:
        # precision comes from [train] bf16 / fp16 through TrainingArguments, not the launcher
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if not cuda:
            cmd += ["--num_cpu_threads_per_process", str(cpu_threads(recipe))]
    return [*cmd, "-m", "runner.worker", str(spec)]


def fsdp_flags(recipe: Recipe) -> list[str]:
    """FSDP-QLoRA as peft and bitsandbytes document it: full shard, flat parameters
    (use_orig_params false, so the peft wrap policy puts the trainable adapters in their own
    units), module states broadcast from rank 0, sharded checkpoints."""
    return [
        "--use_fsdp",
        "--fsdp_sharding_strategy",
        "FULL_SHARD",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_backward_prefetch",
        "BACKWARD_PRE",
        "--fsdp_forward_prefetch",
        "false",
        "--fsdp_state_dict_type",
        "SHARDED_STATE_DICT",
        "--fsdp_use_orig_params",
        "false",
        "--fsdp_sync_module_states",
        "true",
        "--fsdp_cpu_ram_efficient_loading",
        "false",
        "--fsdp_offload_params",
        "false",
    ]


def what_next(out_dir: Path) -> str:
    """What the next `recipe run` does after a failed or stopped launch, and why."""
    newest, skipped = newest_valid(out_dir)
    if newest is not None:
        return f"`recipe run` resumes from checkpoint {step_of(newest)}"
    return f"`recipe run` starts it again ({skipped[0] if skipped else 'no checkpoint was saved'})"


def cpu_threads(recipe: Recipe) -> int:
    """CPU-only runs (tests): split the cores between the processes instead of oversubscribing."""
    per = (os.cpu_count() or 1) // max(int(recipe.get("launch.num_processes")), 1)
    return max(per, 1)


def worker_env(cuda: bool) -> dict[str, str]:
    """Ours, with unbuffered output (the allocator settings runner.stages chose come along)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def release_gpu(ctx: Context) -> bool:
    """Drop the model quantize-load kept for an in-process train: the workers load their own.
    Returns whether CUDA is available (imports torch: the train stage needs it anyway)."""
    import gc

    import torch

    ctx.model = None
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
    return cuda


def run_train(ctx: Context) -> dict[str, Any]:
    """Run the train stage through accelerate; the metrics rank 0 reported."""
    recipe = ctx.recipe
    out_dir = attempt_dir(ctx.run_dir, ctx.fingerprint)
    resume = start_attempt(ctx, out_dir)
    cuda = release_gpu(ctx)
    if recipe.get("launch.strategy") == "fsdp" and not cuda:
        raise RecipeError(
            f"{recipe.origin('launch.strategy')}: $.launch.strategy: FSDP needs "
            'CUDA GPUs and none is visible here; use strategy = "ddp" (gloo '
            "processes) on a machine without GPUs"
        )
    launch_dir = ctx.path(LAUNCH_DIR)
    shutil.rmtree(launch_dir, ignore_errors=True)
    launch_dir.mkdir(parents=True)
    stop_file = ctx.path(STOP_FILE)
    stop_file.unlink(missing_ok=True)
    spec = launch_dir / "spec.json"
    write_json_atomic(
        spec,
        {
            "recipe": str(recipe.path),
            "overrides": list(recipe.overrides),
            "unsets": list(recipe.unsets),
            "allow": list(recipe.allowed),  # --allow-path, for the worker's own load
            "run_dir": str(ctx.run_dir),
            "fingerprint": ctx.fingerprint,
            "resume": str(resume) if resume else None,
        },
    )
    cmd = accelerate_command(recipe, spec, cuda=cuda)
    log = ctx.path(LAUNCH_LOG)
    ctx.log(f"train: {describe_launch(recipe, cuda)}; worker output: {log}")
    with open(log, "ab") as err:
        err.write(f"\n$ {' '.join(cmd)}\n".encode())
        err.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            env=worker_env(cuda),
            start_new_session=True,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        relay = threading.Thread(target=relay_lines, args=(proc, ctx.echo), daemon=True)
        relay.start()
        code = wait(ctx, proc, stop_file)
        relay.join(timeout=10)
    result_file = launch_dir / "result.json"
    result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else None
    if result is not None and "metrics" in result:
        # Rank 0 writes its result after the last collective and the final save: training is
        # complete even if a rank then died on its way out (process-group teardown).
        stop_file.unlink(missing_ok=True)
        if code != 0:
            ctx.log(
                f"train: finished, but a training process ended badly on exit "
                f"({worker_failure(launch_dir, log, code, None)}); see {log}"
            )
        return {**recorded_metrics(ctx), **result["metrics"]}
    if code == 0 and recipe.get("launch.machine_rank") > 0:
        return {
            "machine_rank": recipe.get("launch.machine_rank"),
            "outputs": "on machine 0 (checkpoints, adapter, reports)",
        }
    if result is not None and result.get("interrupted") is not None:
        stop_file.unlink(missing_ok=True)  # rank 0 said where it stopped
        raise Interrupted("train")
    if result is not None and result.get("recipe_error"):
        raise RecipeError(result["recipe_error"])
    resumes = what_next(out_dir)
    if stop_file.is_file():
        stop_file.unlink(missing_ok=True)
        ctx.log(f"train: stopped; {resumes}")
        raise Interrupted("train")
    raise StageError(
        "train", f"{worker_failure(launch_dir, log, code, result)}; full log: {log}; {resumes}"
    )


def recorded_metrics(ctx: Context) -> dict[str, Any]:
    """What rank 0 recorded in the stage's state file while it ran (last checkpoint step)."""
    from runner.plan import state_path
    from runner.rundir import state_metrics

    return state_metrics(state_path(ctx.run_dir, "train"))


def relay_lines(proc: subprocess.Popen[str], echo: Any) -> None:
    """Rank 0's lines (it alone prints; it also writes them to logs/run.log) on our stdout."""
    assert proc.stdout is not None
    for line in proc.stdout:
        echo(line.rstrip("\n"))


def wait(ctx: Context, proc: subprocess.Popen[str], stop_file: Path) -> int:
    """Wait for the launcher; first SIGINT/SIGTERM asks for a checkpoint, a second one kills."""
    asked = {"at": 0.0}

    def handler(signum: int, frame: Any) -> None:
        if asked["at"]:
            kill_group(proc)
            return
        asked["at"] = time.monotonic()
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.write_text(signal.Signals(signum).name, encoding="utf-8")
        print(
            "\ninterrupt: the training processes save a checkpoint after this step "
            "(again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if asked["at"] and time.monotonic() - asked["at"] > STOP_GRACE_S:
                    kill_group(proc)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def worker_failure(launch_dir: Path, log: Path, code: int, result: dict[str, Any] | None) -> str:
    """One line on why the workers failed. torchrun's report names the rank that failed first
    (the others fail because a peer is gone): its own error file says why, else how it died
    (killed, out of memory); without a report, rank 0's message or any rank's error file."""
    errors: dict[int, str] = {}
    for path in launch_dir.glob("rank-*.error.json"):
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            errors[int(found["rank"])] = str(found["error"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    root = torchrun_root_cause(log)
    if root is not None:
        rank, how = root
        if rank in errors:
            return f"rank {rank}: {errors[rank]}"
        return f"training process rank {rank} {how}"
    if result is not None and result.get("error"):
        return str(result["error"])
    if errors:
        rank = min(errors)
        return f"rank {rank}: {errors[rank]}"
    return f"the training processes exited with code {code}"


def torchrun_root_cause(log: Path) -> tuple[int, str] | None:
    """(rank, 'was killed by SIGKILL') from the last torchrun failure report in the log."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if "Root Cause" not in text:
        return None
    section = text[text.rfind("Root Cause") :]
    rank = re.search(r"rank\s*:\s*(\d+)", section)
    exitcode = re.search(r"exitcode\s*:\s*(-?\d+)", section)
    if not rank or not exitcode:
        return None
    code = int(exitcode.group(1))
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return int(rank.group(1)), how

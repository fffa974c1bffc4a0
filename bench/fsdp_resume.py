#!/usr/bin/env python3
"""FSDP-QLoRA resume check on one GPU: a run killed after step 3 and resumed from checkpoint 2
must end where an uninterrupted run ends (same losses after the resume, same adapter).

    python bench/fsdp_resume.py [--work /tmp/recipe-fsdp] [--tag NAME]

FSDP in one process (launch.config_file: an accelerate yaml with distributed_type FSDP and
num_processes 1; launch.strategy = fsdp adds the runner's FSDP flags), on bench/gpu.py's SMOKE
shape (a 2-layer GLM with random weights, NF4, LoRA on every linear layer), adgen-fast.toml's
settings, max_steps 4, save_steps 2, a loss logged every step. Four `recipe run --until train`
(the first two side by side):

    whole       uninterrupted
    killed      RECIPE_FAULT=after_step:3 (SIGKILL after step 3; checkpoint 2 is on disk)
    resumed     the same run dir again: resumes from checkpoint 2 and trains steps 3-4
    reused      whole's run dir with its train state and adapter deleted: its last checkpoint
                (step 4) is taken as it is (reuse_last_checkpoint), nothing trained

Prints and writes (to $OUT or bench/results) each run's losses and metrics, the largest
|difference| of the losses and of every adapter tensor against "whole", and the device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks write their recipes into scratch folders that read this project's templates,
# data and recipes: the person running a benchmark allows that (README: recipes you did not write).
os.environ.setdefault("RECIPE_ALLOW_PATHS", str(ROOT))
sys.path.insert(0, str(ROOT))

from bench import gpu  # noqa: E402

ACCELERATE = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
rdzv_backend: static
same_network: true
fsdp_config:
  fsdp_version: 1
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_forward_prefetch: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_use_orig_params: false
  fsdp_sync_module_states: true
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""
OVERRIDES = [
    "launch.strategy=fsdp",
    "quantization.bnb_4bit_compute_dtype=bfloat16",
    "quantization.bnb_4bit_quant_storage=bfloat16",
    "train.optim=adamw_torch",
    "train.max_steps=4",
    "train.save_steps=2",
]


def recipe_run(
    recipe: Path, run_dir: Path, config: Path, fault: str | None, port: int = 29500
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "runner.cli", "run", str(recipe), "--until", "train"]
    where = [f"recipe.output_dir={run_dir}", f"launch.config_file={config}"]
    for o in [*OVERRIDES, *where, f"launch.main_process_port={port}"]:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RECIPE_FAULT", None)
    if fault:
        env |= {"RECIPE_FAULT": fault, "RECIPE_FAULT_RANK": "0"}
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = round(time.monotonic() - t0, 1)
    out = (done.stdout + done.stderr).strip()
    lines = out.splitlines()
    return {
        "command": " ".join(cmd[1:])
        + (f"  (RECIPE_FAULT={fault} RECIPE_FAULT_RANK=0)" if fault else ""),
        "exit": done.returncode,
        "wall_s": wall,
        "train_lines": [x for x in lines if x.startswith("train:")],
        "last_line": lines[-1] if lines else "",
        "log": out,
    }


def losses(run_dir: Path) -> dict[int, float]:
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def adapter(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "train" / "final" / "adapter_model.safetensors"))


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The largest |difference| over every tensor of two adapters (same keys required)."""
    if sorted(a) != sorted(b):
        return {"same_keys": False}
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {
        "same_keys": True,
        "tensors": len(a),
        "max_abs_diff": diff,
        "bitwise_equal": all(bool((a[k] == b[k]).all()) for k in a),
        "abs_sum": [
            round(sum(float(t.float().abs().sum()) for t in x.values()), 6) for x in (a, b)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--work", default="/tmp/recipe-fsdp", type=Path)
    parser.add_argument("--tag", default="fsdp-resume")
    parser.add_argument("--no-reuse", action="store_true", help="skip the 'reused' run")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    )
    args = parser.parse_args()
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RECIPE_CACHE", str(args.work / "cache"))
    model = gpu.prepare(args.work, gpu.SMOKE)
    recipe = gpu.recipe_file(args.work, model, "adgen-fast.toml")
    config = args.work / "accelerate-fsdp-1.yaml"
    config.write_text(ACCELERATE)
    whole, broken = args.work / "runs" / "whole", args.work / "runs" / "broken"
    for d in (whole, broken):
        shutil.rmtree(d, ignore_errors=True)
    # The random weights once, before two runs would race to build them.
    from runner.models.resolve import materialize
    from runner.recipe import load_recipe

    materialize(load_recipe(recipe), print)
    # whole and killed side by side on the one GPU (a tiny model; each its own rendezvous port)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(recipe_run, recipe, whole, config, None, 29500)
        second = pool.submit(recipe_run, recipe, broken, config, "after_step:3", 29501)
        runs = {"whole": first.result(), "killed": second.result()}
    runs["resumed"] = recipe_run(recipe, broken, config, None)
    results: dict[str, Any] = {
        "what": "FSDP-QLoRA (1 process) killed after step 3, resumed from checkpoint 2, "
        "against an uninterrupted run",
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": dt.date.today().isoformat(),
        "versions": {
            m: __import__(m).__version__
            for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
        },
        "recipe": {
            "file": "recipes/adgen-fast.toml",
            "shape": "bench/gpu.py SMOKE",
            "overrides": OVERRIDES,
        },
        "runs": runs,
    }
    ok = runs["whole"]["exit"] == 0 and runs["resumed"]["exit"] == 0
    if ok:
        reference = adapter(whole)
        kept = {k: v.clone() for k, v in reference.items()}
        state = json.loads((whole / "state" / "train.json").read_text())
        results["whole_metrics"] = state.get("metrics")
        results["resumed_metrics"] = json.loads((broken / "state" / "train.json").read_text()).get(
            "metrics"
        )
        a, b = losses(whole), losses(broken)
        results["losses"] = {"whole": a, "resumed": b}
        results["loss_max_abs_diff"] = max(abs(a[s] - b[s]) for s in a if s in b)
        results["adapter_resumed_vs_whole"] = compare(reference, adapter(broken))
    if ok and not args.no_reuse:
        (whole / "state" / "train.json").unlink()
        shutil.rmtree(whole / "train" / "final")
        runs["reused"] = recipe_run(recipe, whole, config, None)
        if runs["reused"]["exit"] == 0:
            results["adapter_reused_vs_whole"] = compare(kept, adapter(whole))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{results['date']}-{args.tag}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    for name, r in runs.items():
        print(f"== {name}: exit {r['exit']}, {r['wall_s']} s; {r['command']}")
        print("\n".join(r["train_lines"][-8:]) or r["log"][-3000:])
        if r["exit"] not in (0,) and name != "killed":
            print(r["log"][-6000:])
    for key in (
        "losses",
        "loss_max_abs_diff",
        "adapter_resumed_vs_whole",
        "adapter_reused_vs_whole",
    ):
        if key in results:
            print(key, json.dumps(results[key]))
    print(f"results {path}")


if __name__ == "__main__":
    main()

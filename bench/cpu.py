#!/usr/bin/env python3
"""CPU figures for BENCHMARKS.md: start-up times, the demo end to end, the all-cached run.

    python bench/cpu.py [--repeat 5] [--cold] [--work DIR]

Every command runs in a fresh process (`python -m runner.cli`, what the `recipe` script runs),
from the project root, timed from outside (wall clock, so interpreter start-up is included):

- start-up: the median of --repeat runs of `recipe --help`, `recipe validate` and `recipe plan`
  on recipes/adgen-tiny.toml (torch-free commands), next to a bare `python -c pass`;
- the demo: `recipe run recipes/adgen-tiny.toml` into a fresh run directory (--set
  recipe.output_dir), with the tiny model from RECIPE_CACHE (built there first if it is not
  cached yet, and then said so), then the same command again, when every stage is up to date;
- with --cold, first the demo with an empty RECIPE_CACHE and datasets cache (the tiny model's
  tokenizer training and pre-training included, about 45 s more).

Each stage's seconds come from its state file. The machine's cores and load average are printed
next to the figures, with the share of the cores' time the runs got: on a shared machine the
wall times are inflated when that share is low.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks write their recipes into scratch folders that read this project's templates,
# data and recipes: the person running a benchmark allows that (README: recipes you did not write).
os.environ.setdefault("RECIPE_ALLOW_PATHS", str(ROOT))
TINY = "recipes/adgen-tiny.toml"
STAGES = ("format", "tokenize", "quantize-load", "train", "save", "compare")


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def timed(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        sys.exit(f"{' '.join(args[2:])}: exit {done.returncode}: {' | '.join(tail)}")
    return seconds, done


def recipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner.cli", *args]


def stage_seconds(run_dir: Path) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        state = json.loads((run_dir / "state" / f"{stage}.json").read_text(encoding="utf-8"))
        out[stage] = float(state["metrics"].get("seconds", 0.0))
    return out


def demo(label: str, run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    seconds, done = timed(recipe("run", TINY, "--set", f"recipe.output_dir={run_dir}"), env)
    output = done.stdout + done.stderr
    skipped = output.count("skipped (up to date)")
    stages = {} if skipped == len(STAGES) else stage_seconds(run_dir)
    built = "building the embedded tiny model" in output
    return {"label": label, "seconds": seconds, "stages": stages, "built": built}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per start-up command")
    parser.add_argument("--cold", action="store_true", help="also the demo on empty caches")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    load_before, t_start, cpu_start = load(), time.perf_counter(), children_cpu()

    startup: dict[str, float] = {}
    for label, command in (
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("recipe --help", recipe("--help")),
        (f"recipe validate {TINY}", recipe("validate", TINY)),
        (f"recipe plan {TINY}", recipe("plan", TINY)),
    ):
        startup[label] = statistics.median(timed(command, env)[0] for _ in range(args.repeat))
        print(f"{label}: {startup[label]:.2f} s", flush=True)

    runs = []
    if args.cold:
        cold = dict(
            env,
            RECIPE_CACHE=str(work / "cold-cache"),
            HF_DATASETS_CACHE=str(work / "cold-hf-datasets"),
        )
        runs.append(demo("demo, empty caches (tiny model built)", work / "run-cold", cold))
        print(f"{runs[-1]['label']}: {runs[-1]['seconds']:.1f} s", flush=True)
    fresh = work / f"run-{time.time_ns()}"
    runs.append(demo("demo, fresh run dir, model cached", fresh, env))
    if runs[-1]["built"]:
        runs[-1]["label"] = "demo, fresh run dir (tiny model built: was not cached)"
    print(f"{runs[-1]['label']}: {runs[-1]['seconds']:.1f} s", flush=True)
    runs.append(demo("demo, second run (all up to date)", fresh, env))
    print(f"{runs[-1]['label']}: {runs[-1]['seconds']:.1f} s", flush=True)

    wall, cpu = time.perf_counter() - t_start, children_cpu() - cpu_start
    cores = len(os.sched_getaffinity(0))
    threads = env["OMP_NUM_THREADS"]
    usable = min(cores, int(threads)) if threads.isdigit() else cores
    print(
        f"\ncpu: {cores} cores, OMP_NUM_THREADS={threads}, load average {load_before} before, "
        f"{load()} after; the runs got {cpu / (wall * usable):.0%} of {usable} core(s)' time "
        "(low: others shared the CPU)"
    )
    print(f"python {sys.version.split()[0]}, {date_and_versions()}")
    width = 58
    print(f"\n{'what':<{width}}{'wall s':>8}")
    for label, seconds in startup.items():
        print(f"{label + f' (median of {args.repeat})':<{width}}{seconds:>8.2f}")
    for run in runs:
        stages = ", ".join(f"{s} {run['stages'][s]:.1f}" for s in run["stages"])
        print(f"{run['label']:<{width}}{run['seconds']:>8.1f}   stages: {stages or 'all skipped'}")
    return 0


def date_and_versions() -> str:
    from importlib import metadata

    versions = []
    for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return f"{time.strftime('%Y-%m-%d')}, " + ", ".join(versions)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Format + tokenize throughput on generated AdvertiseGen-length rows (not a timed test).

    python bench/data.py [--rows 100000] [--num-proc 2] [--work DIR]

Generates --rows records with runner.data.demo (content ~45 characters, summary ~110, like
AdvertiseGen), then runs the format and tokenize stages of recipes/adgen-tiny.toml on them
(`recipe run --until tokenize`, the tiny model's tokenizer, tokenize.num_proc = --num-proc) in a
fresh run directory and a fresh datasets cache, and prints each stage's seconds and rows/s. The
tiny model is built first if it is not cached yet (set RECIPE_CACHE to share it); that build is
not timed. The machine's CPU count and load average are printed next to the figures, since a
shared machine slows them down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks write their recipes into scratch folders that read this project's templates,
# data and recipes: the person running a benchmark allows that (README: recipes you did not write).
os.environ.setdefault("RECIPE_ALLOW_PATHS", str(ROOT))
sys.path.insert(0, str(ROOT))
TARGET_S = 30.0  # for 100k rows on 2 cores


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (datasets' workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")  # no cached Arrow from earlier runs
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    from runner.data.demo import generate_records, write_jsonl
    from runner.models.resolve import materialize
    from runner.recipe import load_recipe
    from runner.run import run_recipe

    data = work / "data"
    t0 = time.perf_counter()
    write_jsonl(data / "train.jsonl", generate_records(args.rows, seed=0))
    write_jsonl(data / "dev.jsonl", generate_records(64, seed=1))
    generated = time.perf_counter() - t0
    run_dir = work / f"run-{time.time_ns()}"
    recipe = load_recipe(
        ROOT / "recipes" / "adgen-tiny.toml",
        (
            f"dataset.path={data}",
            "dataset.heldout_split=dev",
            f"recipe.output_dir={run_dir}",
            f"tokenize.num_proc={args.num_proc}",
        ),
    )
    materialize(recipe, print)  # the tiny model, once; not timed

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for stage in ("format", "tokenize"):
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        run_recipe(recipe, lambda line: None, only=stage)
        wall[stage], cpu[stage] = time.perf_counter() - t0, cpu_seconds() - cpu0
    seconds = {}
    for stage in ("format", "tokenize"):
        state = json.loads((run_dir / "state" / f"{stage}.json").read_text(encoding="utf-8"))
        seconds[stage] = state["metrics"]["seconds"]
    tokens = json.loads((run_dir / "state" / "tokenize.json").read_text())["metrics"]["train"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"rows: {args.rows:,} generated in {generated:.1f} s ({data / 'train.jsonl'})")
    print(f"cpu: {os.cpu_count()} cores, load average {load} (a shared machine slows the figures)")
    for stage in ("format", "tokenize"):
        extra = ""
        if stage == "tokenize":
            extra = (
                f" (num_proc {args.num_proc}; {tokens['tokens']:,} tokens, length p50 "
                f"{tokens['length']['p50']:.0f} max {tokens['length']['max']:.0f})"
            )
        print(
            f"{stage + ':':<10}{seconds[stage]:6.1f} s  {args.rows / seconds[stage]:9,.0f} rows/s, "
            f"{cpu[stage]:5.1f} CPU-s{extra}"
        )
    both = seconds["format"] + seconds["tokenize"]
    print(
        f"format + tokenize: {both:.1f} s, {args.rows / both:,.0f} rows/s; with planning, hashing "
        f"and state files {sum(wall.values()):.1f} s, {sum(cpu.values()):.1f} CPU-seconds "
        "(all processes)"
    )
    cores = len(os.sched_getaffinity(0))
    share = sum(cpu.values()) / (sum(wall.values()) * cores)
    print(
        f"this run got {share:.0%} of {cores} cores' time (CPU-seconds / wall / cores); "
        "below ~90%, other processes shared the CPU and the wall times above are inflated"
    )
    budget = TARGET_S * args.rows / 100_000
    print(
        f"target: <= {budget:.0f} s for {args.rows:,} rows: {'met' if both <= budget else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

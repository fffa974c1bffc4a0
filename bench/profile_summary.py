#!/usr/bin/env python3
"""Where a profiled training step's time goes: reads the traces RECIPE_PROFILE writes
(runner/profiling.py; bench/gpu.py --profile) and prints, per trace, the recorded wall time,
GPU busy time (kernels, copies), communication kernels (NCCL) and how much of them no compute
overlapped, the GPU's idle time, and the longest idle gaps with the CPU calls they coincide
with (a sync, a collective, data collation ...).

    python bench/profile_summary.py RUN_DIR/logs/profile-rank*.json.gz [--gaps 8]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU = ("kernel", "gpu_memcpy", "gpu_memset")
CPU = ("cuda_runtime", "cpu_op", "cuda_driver")


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


# Kernel-name fragments -> a family, first match wins: where a step's GPU time goes at a glance.
FAMILIES = (
    ("nccl", "communication"),
    ("flex", "attention"),
    ("triton_tem", "attention"),  # inductor's templates here are FlexAttention's kernels
    ("attention", "attention"),
    ("fmha", "attention"),
    ("dequant", "nf4 dequantize"),
    ("gemm", "matmul"),
    ("gemv", "matmul"),
    ("sm90_xmma", "matmul"),
    ("cutlass", "matmul"),
    ("nvjet", "matmul"),
    ("adam", "optimizer"),
    ("softmax", "loss (softmax, nll)"),
    ("nll_loss", "loss (softmax, nll)"),
    ("triton", "compiled elementwise (triton)"),
    ("elementwise", "eager elementwise"),
    ("reduce", "eager reductions"),
)


def family(kernel: str) -> str:
    lowered = kernel.lower()
    return next((f for fragment, f in FAMILIES if fragment in lowered), "other")


def summarize(path: Path, gaps_shown: int, kernels_shown: int = 8) -> None:
    with gzip.open(path, "rt") as f:
        events: list[dict[str, Any]] = [
            e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e
        ]
    on_gpu = [e for e in events if e.get("cat") in GPU]
    if not on_gpu:
        print(f"{path}: no GPU activity recorded")
        return
    gpu: list[tuple[float, float]] = []
    comm: list[tuple[float, float]] = []  # NCCL kernels
    compute: list[tuple[float, float]] = []
    for e in on_gpu:
        span = (e["ts"], e["ts"] + e["dur"])
        gpu.append(span)
        (comm if "nccl" in e["name"].lower() else compute).append(span)
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    busy = union(gpu)
    wall = end - start
    exposed = total(busy) - total(union(compute))
    print(f"\n{path}")
    print(
        f"  recorded {wall / 1e3:.1f} ms; GPU busy {total(busy) / 1e3:.1f} ms "
        f"({total(busy) / wall:.1%}); idle {(wall - total(busy)) / 1e3:.1f} ms; "
        f"NCCL kernels {total(union(comm)) / 1e3:.1f} ms, not overlapped by compute "
        f"{exposed / 1e3:.1f} ms"
    )
    kernels: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "kernel":
            kernels[e["name"][:70]] += e["dur"]
    for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:kernels_shown]:
        print(f"    {t / 1e3:9.1f} ms  {name}")
    families: dict[str, float] = defaultdict(float)
    for name, t in kernels.items():
        families[family(name)] += t
    print(
        "  kernel time by family: "
        + ", ".join(
            f"{n} {t / 1e3:.1f} ms" for n, t in sorted(families.items(), key=lambda kv: -kv[1])
        )
    )
    idle = [(a[1], b[0]) for a, b in itertools.pairwise(busy)]  # busy is merged: all gaps
    idle.sort(key=lambda g: g[0] - g[1])
    cpu = [e for e in events if e.get("cat") in CPU]
    print(f"  longest GPU idle gaps ({len(idle)} in all):")
    for g0, g1 in idle[:gaps_shown]:
        overlap: dict[str, float] = defaultdict(float)
        for e in cpu:
            o = min(g1, e["ts"] + e["dur"]) - max(g0, e["ts"])
            if o > 0:
                overlap[e["name"][:40]] += o
        busiest = sorted(overlap.items(), key=lambda kv: -kv[1])[:4]
        what = ", ".join(f"{n} {o / 1e3:.1f}" for n, o in busiest) or "no CPU call recorded"
        print(f"    {(g1 - g0) / 1e3:7.1f} ms at +{(g0 - start) / 1e3:7.1f} ms: {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--gaps", type=int, default=8, help="how many idle gaps to show")
    parser.add_argument("--kernels", type=int, default=8, help="how many kernels to show")
    args = parser.parse_args()
    for path in args.traces:
        summarize(path, args.gaps, args.kernels)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""GPU benchmark: the tutorial's configuration against the runner's fast configuration, on
ChatGLM3-6B's shape with random weights, both through the runner's own stages (recipe run).

    python bench/gpu.py [--steps-tutorial 12] [--steps 20] [--variants runner-sdpa,runner]
                        [--parallel] [--gpus 2,4] [--fsdp 2] [--profile 8:2] [--tag NAME]

One call on a GPU machine: builds the 6B-shape GLM from a config with random weights (the
recipe option model.random_init), formats and tokenizes the shipped demo data (AdvertiseGen
length distribution), then for each configuration runs `recipe run --until train` and reads
the train stage's steady-state metrics. Prints real tokens/s, samples/s, padded tokens/s, peak
allocated/reserved GiB, useful MFU against a bf16 matmul ceiling it measures itself, the ratio
to the tutorial, and the device; writes bench/results/gpu-<date>.json.

The configurations are shipped recipes resolved by the runner's own loader (extends included):
"tutorial" is recipes/adgen.toml with the tutorial's settings as overrides, "runner" is
recipes/adgen-fast.toml as shipped (on CUDA its decoder layers are compiled: torch_compile auto),
its variants change one setting. Every one gets the same local model, data, step count and
logging (every step), nothing else. Numerics checks compare the first logged losses of "runner"
with "runner-eager" (the same layers uncompiled) and with "runner-sdpa" (another attention
kernel; runner's row also carries its pad segment), where both ran: PASS when they agree within
--tolerance.

--parallel runs the single-GPU configurations side by side, one per GPU of the machine, then the
multi-GPU runs (--gpus, --fsdp) one after another on all of them.

--profile STEP[:STEPS] records those optimizer steps of every run with torch.profiler
(RECIPE_PROFILE, runner/profiling.py); `python bench/profile_summary.py RUN/logs/profile-rank*`
then says where the time went (GPU busy, NCCL, idle gaps and the CPU calls during them). A
profiled run's tokens/s include the profiler's overhead and the trace's export: take speed
figures from a run without --profile.

--smoke runs a tiny model on the CPU to check the flow. FlexAttention has no backward on the
CPU, so there a flex configuration runs sdpa with its own pad_to_multiple_of (the numerics
check then compares padded against unpadded rows); the tutorial's fp16 runs in fp32.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks write their recipes into scratch folders that read this project's templates,
# data and recipes: the person running a benchmark allows that (README: recipes you did not write).
os.environ.setdefault("RECIPE_ALLOW_PATHS", str(ROOT))
sys.path.insert(0, str(ROOT))

from bench import shapes  # noqa: E402

# Per configuration: the shipped recipe it runs and the overrides on top of it.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    # The tutorial: every example padded to 512, batch 1 x accumulation 4, fp16, checkpointing,
    # peft's fp32 upcast. (fp16 autocast with an fp16 compute dtype: the tutorial's fp16 with a
    # bf16 compute dtype is refused by the recipe validator as a dtype mix.)
    "tutorial": (
        "adgen.toml",
        [
            "tokenize.max_length=512",
            "train.padding=max_length",
            "train.per_device_train_batch_size=1",
            "train.gradient_accumulation_steps=4",
            "train.fp16=true",
            "train.bf16=false",
            "train.gradient_checkpointing=true",
            "quantization.bnb_4bit_compute_dtype=float16",
            "quantization.upcast_to_fp32=true",
            "train.packing=false",
            "train.torch_compile=false",
        ],
    ),
    # The runner's fast path as shipped: 32 examples packed per row (position ids restart),
    # flex_attention, rows padded to a multiple of 512 (auto), bf16, checkpointing, decoder
    # layers compiled (torch_compile auto).
    "runner": ("adgen-fast.toml", []),
    "runner-eager": ("adgen-fast.toml", ["train.torch_compile=false"]),
    # sdpa: torch_compile auto is off there (compiled only with flex_attention).
    "runner-sdpa": ("adgen-fast.toml", ["model.attn_implementation=sdpa"]),
    # The memory levers (runner/models/fit.py): "runner" plans its step for 16 GiB
    # (train.memory_budget_gib, as shipped); these change one setting. "!key" is --unset key.
    "runner-fullgpu": ("adgen-fast.toml", ["!train.memory_budget_gib"]),  # the whole card
    "runner-allckpt": ("adgen-fast.toml", ["train.gradient_checkpointing=true"]),  # every layer
    "runner-nochunk": ("adgen-fast.toml", ["train.chunked_cross_entropy=false"]),
    "runner-8bit": ("adgen-fast.toml", ["train.optim=paged_adamw_8bit"]),  # the tutorial's
    # the runner before engine v2: every layer checkpointed, paged 8-bit AdamW
    "runner-v1": (
        "adgen-fast.toml",
        ["train.gradient_checkpointing=true", "train.optim=paged_adamw_8bit"],
    ),
    "runner-nodrop": ("adgen-fast.toml", ["lora.lora_dropout=0.0"]),
    "runner-b64": ("adgen-fast.toml", ["train.per_device_train_batch_size=64"]),
    "runner-b128": ("adgen-fast.toml", ["train.per_device_train_batch_size=128"]),
}
# Pairs whose losses must agree: same batches, another kernel (compiled vs eager layers,
# flex_attention vs sdpa).
NUMERICS = (
    ("runner", "runner-eager"),
    ("runner", "runner-sdpa"),
    ("runner", "runner-allckpt"),  # checkpointing recomputes the same values
    ("runner", "runner-fullgpu"),
)
ALLOC_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


SMOKE = dict(
    shapes.GLM_6B,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=32,
    vocab_size=4000,
)


def prepare(work: Path, config: dict[str, Any]) -> Path:
    """A model folder: the config plus a tokenizer trained on the demo corpus."""
    from runner.models.tiny import train_tokenizer

    folder = work / f"glm-{config['hidden_size']}"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    corpus = ROOT / "data" / "adgen-demo" / "pretrain.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    train_tokenizer(texts, vocab_size=4000, max_length=8192).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def recipe_file(work: Path, model: Path, name: str) -> Path:
    """recipes/<name> resolved by the runner (extends merged, as written: defaults stay
    defaults) with the model and data swapped for local ones and logging at every step."""
    import tomli_w

    from runner.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / name)
    data = copy.deepcopy(recipe.written)
    data["model"] = {**data.get("model", {}), "name_or_path": str(model), "random_init": True}
    data["model"].pop("revision", None)
    data["dataset"] = {
        "path": str(ROOT / "data" / "adgen-demo"),
        "split": "train",
        "heldout_split": "dev[:8]",
    }
    data["template"] = {
        k: str(recipe.resolve(v)) if k.endswith("_file") else v for k, v in data["template"].items()
    }
    data["compare"] = {"num_examples": 0}
    data["train"].update(save_steps=100000, logging_steps=1, report_to="none")
    path = work / f"bench-{Path(name).stem}.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def overrides_for(name: str, recipe: Path, smoke: bool) -> list[str]:
    """The configuration's overrides; with --smoke, flex_attention (no backward on the CPU)
    becomes sdpa with the flex configuration's own pad_to_multiple_of, and fp16 fp32."""
    from runner.data.collate import pad_multiple
    from runner.recipe import load_recipe

    overrides = list(CONFIGS[name][1])
    resolved = load_recipe(
        recipe,
        [o for o in overrides if not o.startswith("!")],
        unsets=[o[1:] for o in overrides if o.startswith("!")],
    )
    if smoke and resolved.get("model.attn_implementation") == "flex_attention":
        multiple = pad_multiple(resolved, cuda=False)
        overrides += ["model.attn_implementation=sdpa", f"train.pad_to_multiple_of={multiple}"]
    if smoke and resolved.get("train.fp16"):  # fp16 autocast needs CUDA: fp32 on the CPU
        overrides += ["train.fp16=false", "quantization.bnb_4bit_compute_dtype=float32"]
    return overrides


def matmul_ceiling() -> float:
    """Median bf16 TFLOP/s of an 8192^3 matmul on this GPU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def option(override: str) -> tuple[str, str]:
    """The command-line option of an override: "!key" unsets key."""
    return ("--unset", override[1:]) if override.startswith("!") else ("--set", override)


def run_config(
    name: str, recipe: Path, overrides: list[str], work: Path, steps: int, gpu: str | None = None
) -> dict[str, Any]:
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh measurement, not a skipped stage
    cmd = [
        sys.executable,
        "-m",
        "runner.cli",
        "run",
        str(recipe),
        "--until",
        "train",
        "--set",
        f"recipe.output_dir={run_dir}",
        "--set",
        f"train.max_steps={steps}",
        *[x for o in overrides for x in option(o)],
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if name == "tutorial" and not any(k in env for k in ALLOC_VARIABLES):
        # The runner turns on expandable segments (runner/stages/__init__.py); the tutorial's
        # script ran with PyTorch's default allocator.
        from runner.stages import allocator_variable

        env[allocator_variable() or "PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:False"
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    log = work / f"{name}.log"
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        return {"error": " | ".join(tail), "wall_s": round(time.monotonic() - t0, 1)}
    state = json.loads((run_dir / "state" / "train.json").read_text())
    losses = json.loads((run_dir / "train" / "log_history.json").read_text())
    metrics = dict(state["metrics"])
    metrics["losses"] = [h["loss"] for h in losses if "loss" in h]
    metrics["wall_s"] = round(time.monotonic() - t0, 1)
    source = CONFIGS[name][0] if name in CONFIGS else CONFIGS["runner"][0]  # scaling runs
    metrics["recipe"] = {"file": f"recipes/{source}", "overrides": overrides}
    return metrics


def numerics(curves: dict[str, list[float]], tolerance: float, first: int) -> list[dict[str, Any]]:
    """The first logged losses of each NUMERICS pair that ran, side by side."""
    checks = []
    for a, b in NUMERICS:
        pairs = list(zip(curves.get(a, []), curves.get(b, []), strict=False))[:first]
        if not pairs:
            continue
        diff = max(abs(x - y) for x, y in pairs)
        relative = max(abs(x - y) / max(abs(y), 1e-9) for x, y in pairs)
        checks.append(
            {
                "compared": f"{a} vs {b}",
                "steps": len(pairs),
                "max_abs_loss_diff": round(diff, 5),
                "max_relative_loss_diff": round(relative, 6),
                "tolerance": tolerance,
                "pass": relative <= tolerance,
                "first": [round(x, 4) for x in pairs[0]],
                "last": [round(x, 4) for x in pairs[-1]],
            }
        )
    return checks


def scaling_runs(gpus: str, fsdp: int) -> list[tuple[str, str, list[str]]]:
    """(name, configuration, extra overrides) of the multi-GPU runs of 'runner'."""
    runs = [
        (f"runner-{n}gpu", "runner", [f"launch.num_processes={n}"])
        for n in (int(x) for x in gpus.split(",") if x)
        if n > 1
    ]
    if fsdp:
        runs.append(
            (
                f"runner-fsdp-{fsdp}gpu",
                "runner",
                [
                    f"launch.num_processes={fsdp}",
                    "launch.strategy=fsdp",
                    "quantization.bnb_4bit_compute_dtype=bfloat16",
                    "quantization.bnb_4bit_quant_storage=bfloat16",
                    "train.optim=adamw_torch",
                ],
            )
        )
    return runs


def scaling_table(configs: dict[str, Any]) -> list[dict[str, Any]]:
    """Real tokens/s of 'runner' on 1 GPU and its multi-GPU runs: speed-up, efficiency."""
    one = configs.get("runner", {}).get("real_tokens_per_second")
    if not one:
        return []
    rows = []
    for name, m in configs.items():
        if not (name == "runner" or (name.startswith("runner-") and name.endswith("gpu"))):
            continue
        if "real_tokens_per_second" not in m:
            continue
        gpus = int(m.get("processes", 1))
        rate = m["real_tokens_per_second"]
        rows.append(
            {
                "config": name,
                "gpus": gpus,
                "real_tokens_per_second": rate,
                "per_gpu": rate / gpus,
                "speedup": rate / one,
                "efficiency": rate / one / gpus,
                "peak_allocated_gib": m.get("peak_allocated_gib", float("nan")),
                "peak_reserved_gib": m.get("peak_reserved_gib", float("nan")),
                "per_process_real_tokens_per_second": m.get("real_tokens_per_second_per_process"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--work", default="/tmp/recipe-bench", type=Path)
    parser.add_argument("--steps-tutorial", type=int, default=12)
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="training steps per runner configuration (3 are warm-up)",
    )
    parser.add_argument(
        "--variants",
        default="runner-sdpa,runner",
        help=f"after the tutorial, any of: {', '.join(list(CONFIGS)[1:])}",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.005,
        help="numerics check: largest relative loss difference runner vs runner-sdpa (bf16 "
        "noise; random weights have losses of 10-50, so an absolute bound would not carry)",
    )
    parser.add_argument(
        "--numerics-steps",
        type=int,
        default=10,
        help="numerics check: how many of the first logged losses to compare",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny config on the CPU: checks the flow"
    )
    parser.add_argument(
        "--gpus",
        default="",
        help="scaling: run 'runner' again with `recipe run --gpus N` for each N (e.g. 2,4); "
        "same per-GPU micro-batch, DDP",
    )
    parser.add_argument(
        "--fsdp",
        type=int,
        default=0,
        help="scaling: one FSDP-QLoRA run of 'runner' on this many GPUs (bf16 quant storage, "
        "adamw_torch)",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run the single-GPU configurations side by side, one per GPU of this machine "
        "(same card model; each is still one process on one GPU), then the multi-GPU runs",
    )
    parser.add_argument(
        "--profile",
        default="",
        metavar="STEP[:STEPS]",
        help="record these optimizer steps of every run with torch.profiler (RECIPE_PROFILE); "
        "bench/profile_summary.py reads the traces (run dir logs/profile-rank*.json.gz); the "
        "run's tokens/s then include the profiler's overhead",
    )
    parser.add_argument("--no-tutorial", action="store_true", help="skip the tutorial row")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in CONFIGS or v == "tutorial"]
    if unknown:
        parser.error(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(list(CONFIGS)[1:])}"
        )

    import torch

    os.environ.setdefault("RECIPE_CACHE", str(args.work / "cache"))
    if args.profile:
        os.environ["RECIPE_PROFILE"] = args.profile
    args.work.mkdir(parents=True, exist_ok=True)
    model = prepare(args.work, SMOKE if args.smoke else shapes.GLM_6B)
    runs: list[tuple[str, str, list[str]]] = [
        (n, n, []) for n in ([] if args.no_tutorial else ["tutorial"]) + variants
    ]
    runs += scaling_runs(args.gpus, args.fsdp)
    recipes = {f: recipe_file(args.work, model, f) for f in {CONFIGS[c][0] for _, c, _ in runs}}
    ceiling = matmul_ceiling() if torch.cuda.is_available() else float("nan")
    params = 6.24e9
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": dt.date.today().isoformat(),
        "versions": {
            m: __import__(m).__version__
            for m in ("torch", "transformers", "peft", "bitsandbytes", "datasets")
        },
        "allocator": {k: os.environ[k] for k in ALLOC_VARIABLES if k in os.environ}
        or "runner default (expandable segments; tutorial: off)",
        "matmul_ceiling_tflops": round(ceiling, 1),
        "configs": {},
    }
    # The random weights once, before any run (parallel runs would race to build them).
    from runner.models.resolve import materialize
    from runner.recipe import load_recipe

    materialize(load_recipe(next(iter(recipes.values()))), print)
    out = args.out / f"gpu-{results['date']}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def measure(name: str, config: str, extra: list[str], gpu: str | None) -> None:
        steps = args.steps_tutorial if name == "tutorial" else args.steps
        recipe = recipes[CONFIGS[config][0]]
        overrides = overrides_for(config, recipe, args.smoke) + extra
        m = run_config(name, recipe, overrides, args.work, steps, gpu)
        if "real_tokens_per_second" in m:
            # LoRA on a frozen base: forward 2N + input-gradient backward 2N FLOPs per token.
            m["useful_mfu"] = round(4 * params * m["real_tokens_per_second"] / (ceiling * 1e12), 4)
        if gpu is not None:
            m["gpu"] = gpu
        with lock:
            results["configs"][name] = m
            curves = {n: c["losses"] for n, c in results["configs"].items() if c.get("losses")}
            results["numerics"] = numerics(curves, args.tolerance, args.numerics_steps)
            out.write_text(json.dumps(results, indent=2))  # kept if a later run runs out of time
            print(name, json.dumps({k: v for k, v in m.items() if k != "losses"}), flush=True)

    single = [r for r in runs if not any(e.startswith("launch.") for e in r[2])]
    several = [r for r in runs if r not in single]
    gpus = max(torch.cuda.device_count(), 1)
    if args.parallel and gpus > 1:
        # One single-GPU run per GPU at a time; each is still a single process on one GPU.
        free: queue.Queue[str] = queue.Queue()
        for i in range(gpus):
            free.put(str(i))

        def on_a_free_gpu(run: tuple[str, str, list[str]]) -> None:
            gpu = free.get()
            try:
                measure(*run, gpu)
            finally:
                free.put(gpu)

        with ThreadPoolExecutor(max_workers=gpus) as pool:
            list(pool.map(on_a_free_gpu, single))
    else:
        for run in single:
            measure(*run, None)
    for run in several:
        measure(*run, None)
    done = results["configs"]
    results["configs"] = {n: done[n] for n, _, _ in runs if n in done}  # in the asked order
    checks = results["numerics"]
    base = results["configs"].get("tutorial", {}).get("real_tokens_per_second")
    out.write_text(json.dumps(results, indent=2))
    print(f"\ndevice {results['device']}; bf16 matmul ceiling {ceiling:.0f} TFLOP/s; results {out}")
    print(
        f"{'config':<16}{'real tok/s':>11}{'x tutorial':>11}{'samples/s':>10}{'padded tok/s':>13}"
        f"{'peak alloc':>11}{'estimate':>9}{'est/meas':>9}{'reserved':>9}{'MFU':>7}"
        f"{'ckpt':>6}{'loss':>10}{'lengths':>8}{'wall s':>8}"
    )
    for name, m in results["configs"].items():
        if "error" in m:
            print(f"{name:<16} failed: {m['error'][:200]}")
            continue
        if "real_tokens_per_second" not in m:
            print(f"{name:<16} too few steps for a steady state ({m.get('global_step')})")
            continue
        ratio = m["real_tokens_per_second"] / base if base else float("nan")
        nan = float("nan")
        est = m.get("memory_estimate") or {}
        estimate = est.get("estimated_peak_gib", nan)
        measured = m.get("peak_allocated_gib", nan)
        ckpt = f"{est['checkpointed_layers']}/{est['layers']}" if est else "-"
        print(
            f"{name:<16}{m['real_tokens_per_second']:>11.0f}{ratio:>11.1f}"
            f"{m['samples_per_second']:>10.2f}{m['padded_tokens_per_second']:>13.0f}"
            f"{measured:>11.2f}{estimate:>9.2f}{estimate / measured:>9.3f}"
            f"{m.get('peak_reserved_gib', nan):>9.1f}{m['useful_mfu']:>7.1%}{ckpt:>6}"
            f"{est.get('loss_chunking', '-'):>10}{m.get('batch_shapes', 0):>8}{m['wall_s']:>8.0f}"
        )
    for check in checks:
        a, b = check["first"], check["last"]
        print(
            f"\nnumerics: {check['compared']} (same batches), first {check['steps']} logged "
            f"losses: max |diff| {check['max_abs_loss_diff']:.5f} "
            f"({check['max_relative_loss_diff']:.3%}), tolerance {check['tolerance']:.1%}: "
            f"{'PASS' if check['pass'] else 'FAIL'} (first {a[0]} / {a[1]}, last {b[0]} / {b[1]})"
        )
    asked = {"tutorial", *variants}
    for a, b in NUMERICS:
        if {a, b} <= asked and not any(c["compared"] == f"{a} vs {b}" for c in checks):
            print(f"\nnumerics: {a} vs {b} not checked (a configuration failed or logged no loss)")
    scaling = scaling_table(results["configs"])
    if scaling:
        results["scaling"] = scaling
        out.write_text(json.dumps(results, indent=2))
        print(
            f"\n{'scaling':<16}{'GPUs':>5}{'real tok/s':>11}{'per GPU':>9}{'speed-up':>9}"
            f"{'efficiency':>11}{'peak alloc/GPU':>15}{'reserved/GPU':>13}"
        )
        for row in scaling:
            print(
                f"{row['config']:<16}{row['gpus']:>5}{row['real_tokens_per_second']:>11.0f}"
                f"{row['per_gpu']:>9.0f}{row['speedup']:>9.2f}{row['efficiency']:>11.0%}"
                f"{row['peak_allocated_gib']:>15.1f}{row['peak_reserved_gib']:>13.1f}"
            )


if __name__ == "__main__":
    main()

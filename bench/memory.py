#!/usr/bin/env python3
"""Memory: the estimate of `recipe plan --model` against the measured peak of real training.

    python bench/memory.py               # CPU: recipes/adgen-tiny.toml on the tiny model
    python bench/memory.py --gpu-6b      # GPU: ChatGLM3-6B's shape with random weights

CPU: formats and tokenizes the recipe's data (`recipe run --until tokenize` into --work), prints
the estimate (runner.models.estimate: the config, the tokenize stage's measured lengths x batch),
then runs quantize-load and train in a fresh process and measures the peak resident memory
above what that process held once its libraries were imported (the kernel's high-water mark,
reset just before loading). It trains 10 steps with train.group_by_length = true, whose sampler
puts the batch holding the longest row first: the step the estimate describes (batch x longest
row, padded to it) is then measured for sure.
The measuring process runs with MALLOC_MMAP_THRESHOLD_=131072 so that freed tensors go back to
the system and RSS follows the live tensors; glibc's default keeps freed activation memory in
its heap (RSS up to ~2x the live peak here); --glibc-default measures that instead.

GPU (one command, local files only): builds GLM-6B (THUDM/chatglm3-6b's config in transformers'
native GLM terms) on the meta device, materializes it with random bf16 weights on the GPU and
saves it to --work (~12 GB, reused by later calls), then for each configuration, in a fresh
process: loads it the quantize-load stage's way (runner.models.load.load_for_training: NF4 +
double quant, LoRA on the ChatGLM3 names of recipes/adgen.toml), trains a few steps on random
rows of --length tokens with the train stage's TrainingArguments, and compares
torch.cuda.max_memory_allocated with the estimate's GPU-heap peak (paged optimizer state lives
in unified memory, outside the allocator, and is left out of both).

Prints one line per configuration: estimate, measured, difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks write their recipes into scratch folders that read this project's templates,
# data and recipes: the person running a benchmark allows that (README: recipes you did not write).
os.environ.setdefault("RECIPE_ALLOW_PATHS", str(ROOT))
sys.path.insert(0, str(ROOT))

from bench import shapes  # noqa: E402

GIB = float(2**30)
MIB = float(2**20)

GLM_6B: dict[str, Any] = {**shapes.GLM_6B, "dtype": "bfloat16"}  # ChatGLM3-6B, native GLM terms

# GPU configurations: --set overrides on top of recipes/adgen.toml, and the rows per step.
GPU_CONFIGS: dict[str, tuple[list[str], int]] = {
    # the tutorial's setup: batch 1, checkpointing, NF4 + double quant, bf16, paged 8-bit AdamW
    "adgen": ([], 1),
    # no checkpointing, 4 rows a step: activations dominate
    "no-ckpt-batch4": (
        ["train.gradient_checkpointing=false", "train.per_device_train_batch_size=4"],
        4,
    ),
    # fp16 compute with peft's fp32 upcast (older GPUs): an fp32 residual stream
    "fp16-upcast": (
        [
            "quantization.bnb_4bit_compute_dtype=float16",
            "train.bf16=false",
            "train.fp16=true",
            "train.per_device_train_batch_size=2",
        ],
        2,
    ),
}


def status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else 0


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fmt(n: float) -> str:
    return f"{n / GIB:.3f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def compare_line(name: str, estimate: float, measured: float) -> str:
    diff = 100 * (estimate - measured) / measured if measured else float("nan")
    return f"{name:<16} estimate {fmt(estimate):>11}   measured {fmt(measured):>11}   {diff:+.1f}%"


# ----------------------------------------------------------------------------- CPU


def cpu(args: argparse.Namespace) -> int:
    from runner.models.estimate import format_model_plan, plan_model
    from runner.recipe import load_recipe

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-memory-")).resolve()
    # group_by_length puts the batch holding the longest row first (transformers' length-grouped
    # sampler), so the step the estimate describes (batch x longest row) comes in a few steps
    overrides = [
        f"recipe.output_dir={work / 'run'}",
        "train.group_by_length=true",
        f"train.max_steps={args.steps or 10}",
        *args.set,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.cli",
            "run",
            str(args.recipe),
            "--until",
            "tokenize",
            "--force",
            *(a for o in overrides for a in ("--set", o)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if prep.returncode != 0:
        print(prep.stdout + prep.stderr, file=sys.stderr)
        return 1
    recipe = load_recipe(args.recipe, overrides)
    plan = plan_model(recipe, cuda=False, bf16_ok=False)
    print("\n".join(format_model_plan(plan)))
    # glibc's malloc raises its mmap threshold as large blocks are freed, then serves activations
    # from its heap and keeps the freed memory: RSS then overstates what is live, by up to ~2x
    # here. A fixed threshold returns freed tensors at once, so RSS follows the live tensors,
    # which is what the estimate counts. --glibc-default measures without it.
    child_env = dict(env) if args.glibc_default else dict(env, MALLOC_MMAP_THRESHOLD_="131072")
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child-cpu",
            str(args.recipe),
            *(a for o in overrides for a in ("--set", o)),
        ],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        print(child.stdout[-4000:] + child.stderr[-4000:], file=sys.stderr)
        return 1
    result = json.loads(child.stdout.strip().splitlines()[-1])
    estimate = plan.memory.peak(plan.checkpointing)
    malloc = "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=131072"
    print(
        f"\nCPU, {recipe.name}: {result['steps']} steps, batch {plan.tokens.batch}, longest row "
        f"{plan.tokens.peak_length} tokens; measured = peak RSS of quantize-load + train above "
        f"the {fmt(result['baseline'])} held after imports ({result['method']}; {malloc})"
    )
    print(compare_line(recipe.name, estimate, result["increase"]))
    return 0


def child_cpu(args: argparse.Namespace) -> int:
    """Runs in a fresh process: import everything, reset the high-water mark, run the stages."""
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import runner.stages.quantize_load
    import runner.stages.train  # noqa: F401
    from runner.quiet import quiet_libraries
    from runner.recipe import load_recipe
    from runner.run import run_recipe

    quiet_libraries()
    recipe = load_recipe(args.child_cpu, args.set)
    for stage in ("quantize-load", "train", "save", "compare"):  # measure a fresh run, not a resume
        (recipe.run_dir / "state" / f"{stage}.json").unlink(missing_ok=True)
    shutil.rmtree(recipe.run_dir / "checkpoints", ignore_errors=True)
    baseline = status_kib("VmRSS") * 1024
    method = "VmHWM reset" if reset_peak_rss() else "ru_maxrss"
    lines: list[str] = []
    run_recipe(recipe, lines.append, force=True, only="train")
    if method == "VmHWM reset":
        peak = status_kib("VmHWM") * 1024
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = json.loads((recipe.run_dir / "state" / "train.json").read_text())
    print(
        json.dumps(
            {
                "baseline": baseline,
                "peak": peak,
                "increase": peak - baseline,
                "method": method,
                "steps": state["metrics"].get("global_step"),
            }
        )
    )
    return 0


# ----------------------------------------------------------------------------- GPU


def build_6b(folder: Path) -> Path:
    """GLM-6B with random bf16 weights, built on the GPU and saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(
        **{k: v for k, v in GLM_6B.items() if k not in ("model_type", "architectures")}
    )
    with torch.device("meta"):  # shapes only, then bf16 storage on the GPU, then random values
        model = GlmForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def gpu(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("--gpu-6b needs a CUDA GPU", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-memory-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = build_6b(work / "glm-6b-random")
    print(f"device: {torch.cuda.get_device_name(0)}; model: {folder} (GLM-6B shape, random bf16)")
    names = args.configs.split(",") if args.configs else list(GPU_CONFIGS)
    failed = 0
    for name in names:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-gpu",
                name,
                "--work",
                str(work),
                "--length",
                str(args.length),
                "--steps",
                str(args.steps or 4),
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            print(f"{name}: failed\n{child.stdout[-3000:]}{child.stderr[-3000:]}", file=sys.stderr)
            failed += 1
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"\n{name}: batch {r['batch']} x {args.length} tokens, {r['steps']} steps; "
            f"{r['trainable']:,} trainable params"
        )
        for line in r["plan"]:
            print("  " + line)
        print(compare_line(name, r["estimate_heap"], r["peak_allocated"]))
        print(
            f"{'':<16} (after loading: measured {fmt(r['load_allocated'])}, estimated weights + "
            f"LoRA {fmt(r['estimate_loaded'])}; peak reserved {fmt(r['peak_reserved'])})"
        )
    return 1 if failed else 0


def gpu_recipe(work: Path, name: str, steps: int) -> Any:
    from runner.recipe import load_recipe

    sets, _ = GPU_CONFIGS[name]
    return load_recipe(
        ROOT / "recipes" / "adgen.toml",
        [
            f"model.name_or_path={work / 'glm-6b-random'}",
            f"recipe.output_dir={work / ('run-' + name)}",
            f"train.max_steps={steps}",
            "train.save_steps=100000",
            "train.report_to=none",
            "train.logging_steps=1",
            *sets,
        ],
    )


def child_gpu(args: argparse.Namespace) -> int:
    import torch
    from transformers import Trainer, default_data_collator

    from runner.context import Context
    from runner.models.estimate import Tokens, format_model_plan, plan_model
    from runner.models.load import load_for_training
    from runner.quiet import quiet_libraries
    from runner.training.loop import training_arguments

    quiet_libraries()
    work = Path(args.work)
    name = args.child_gpu
    batch = GPU_CONFIGS[name][1]
    recipe = gpu_recipe(work, name, args.steps)
    tokens = Tokens(
        batch, args.length, args.length, "random rows of equal length", padding_mask=False
    )
    plan = plan_model(recipe, tokens=tokens)
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
    model, _ = load_for_training(recipe, work / "glm-6b-random")
    load_allocated = torch.cuda.memory_allocated()
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * args.steps * int(recipe.get("train.gradient_accumulation_steps"))):
        ids = torch.randint(3, GLM_6B["vocab_size"], (args.length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * args.length})
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(recipe=recipe, run_dir=run_dir, echo=lambda s: None)
    trainer = Trainer(
        model=model,
        args=training_arguments(ctx, str(run_dir / "checkpoints")),
        train_dataset=rows,
        data_collator=default_data_collator,
    )
    trainer.train()
    m = plan.memory
    print(
        json.dumps(
            {
                "batch": batch,
                "steps": trainer.state.global_step,
                "trainable": plan.trainable,
                "plan": format_model_plan(plan),
                "estimate_heap": m.peak(plan.checkpointing, device_heap=True),
                "estimate_loaded": m.weights + m.lora,
                "peak_allocated": torch.cuda.max_memory_allocated(),
                "peak_reserved": torch.cuda.max_memory_reserved(),
                "load_allocated": load_allocated,
            }
        )
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-6b", action="store_true", help="GPU: GLM-6B shape, random weights")
    p.add_argument(
        "--recipe",
        type=Path,
        default=ROOT / "recipes" / "adgen-tiny.toml",
        help="CPU: the recipe to measure (default: recipes/adgen-tiny.toml)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CPU: recipe overrides (repeatable)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="training steps (CPU default: 10; GPU default: 4)",
    )
    p.add_argument("--length", type=int, default=256, help="GPU: tokens per row (default 256)")
    p.add_argument(
        "--configs", default="", help=f"GPU: comma-separated, of {', '.join(GPU_CONFIGS)}"
    )
    p.add_argument("--work", default="", help="working folder (default: a new temp folder)")
    p.add_argument(
        "--glibc-default",
        action="store_true",
        help="CPU: measure with glibc's default malloc (RSS keeps freed activation memory)",
    )
    p.add_argument("--child-cpu", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-gpu", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_cpu:
        return child_cpu(args)
    if args.child_gpu:
        return child_gpu(args)
    return gpu(args) if args.gpu_6b else cpu(args)


if __name__ == "__main__":
    sys.exit(main())

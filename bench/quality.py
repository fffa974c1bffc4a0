#!/usr/bin/env python3
"""adgen-fast's optimization against adgen's on the CPU: held-out loss after the same epochs.

    python bench/quality.py [--seeds 42 43 44] [--epochs 1] [--rows 1152] [--points 4]
                            [--fast-set KEY=VALUE ...] [--work DIR]

recipes/adgen-fast.toml trains adgen's model on adgen's data with other optimization settings
(32 examples packed into a row, no accumulation, a higher learning rate): 8x fewer, much fuller
steps. This checks that the speed costs no quality. It trains the tiny model of
recipes/adgen-tiny.toml (its model, data, prompt, quantization and LoRA targets) twice per seed,
each time with everything equal but the optimization settings, read from the recipe files
themselves through runner.recipe.load_recipe (OPTIMIZATION lists the keys):

- "adgen": adgen.toml's (batch 1 x accumulation 4, its learning rate, scheduler, warm-up,
  optimizer, LoRA dropout, ...);
- "adgen-fast": adgen-fast.toml's (packing, 32 per row, accumulation 1, ...), with
  model.attn_implementation = "sdpa" (FlexAttention cannot train on the CPU); its
  pad_to_multiple_of ("auto") then pads nothing. --fast-set KEY=VALUE tries another setting on
  this arm only (it is named in the table), to find what a fix to the shipped file would be.

Both arms train `--epochs` passes (train.num_train_epochs, never max_steps) over the first --rows
training rows of data/adgen-demo; 1,152 rows are what adgen.toml trains on (1% of AdvertiseGen,
~1,140 rows), so adgen takes 288 steps an epoch and adgen-fast 36, as on the real data. Each
run is `recipe run recipes/adgen-tiny.toml --until save --set ...` in a fresh process, into a
run directory under --work named by its settings (a second invocation with the same --work
reuses the runs that are up to date: only what changed trains). A checkpoint is kept --points
times an epoch; afterwards this process loads the base model once and computes, for every
checkpoint, the mean loss per trained token on all 200 rows of the dev split (the same rows and
the same measure for every run: right-padded batches of 8, as the compare stage computes its
held-out loss; the Trainer's eval_steps would weigh rows by each arm's own batching).

The tiny model's own learning rate is 4e-3: at adgen's rates it learns slowly, so the absolute
losses say little about ChatGLM3; what this measures is the relative outcome of the two
optimization paths over the same data. Prints one row per run, mean and standard deviation over
the seeds, the paired difference (adgen-fast - adgen, seed by seed), and writes it all to
bench/results/quality-<date>[-<fast-set>].json. One epoch on one core (OMP_NUM_THREADS=1; two
threads on a shared 2-core machine can be many times slower): ~2 minutes an adgen run, ~5.5 an
adgen-fast run (sdpa computes the whole masked attention of a ~5k-token packed row on the CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = "recipes/adgen-tiny.toml"
ARMS = {"adgen": "recipes/adgen.toml", "adgen-fast": "recipes/adgen-fast.toml"}
# The keys that make the optimization path. Not carried over: the model and its LoRA targets,
# the data, precision (bf16/fp16 follow the hardware), and what does not change the math
# (gradient_checkpointing, logging, checkpoints, report_to, torch_compile: off on the CPU).
OPTIMIZATION = (
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.learning_rate",
    "train.lr_scheduler_type",
    "train.warmup_ratio",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.optim",
    "train.packing",
    "train.padding",
    "train.pad_to_multiple_of",
    "train.group_by_length",
    "lora.r",
    "lora.lora_alpha",
    "lora.lora_dropout",
    "lora.use_rslora",
)
BATCH, ACCUMULATION = "train.per_device_train_batch_size", "train.gradient_accumulation_steps"


def as_setting(value: Any) -> str:
    """A recipe value as --set writes it (the loader types it by the schema)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def optimization(settings: dict[str, Any]) -> dict[str, str]:
    """The OPTIMIZATION keys of a recipe's flattened settings, as --set values; FlexAttention
    becomes sdpa (it cannot train on the CPU), the one setting outside OPTIMIZATION carried."""
    out = {k: as_setting(settings[k]) for k in OPTIMIZATION}
    if settings.get("model.attn_implementation") == "flex_attention":
        out["model.attn_implementation"] = "sdpa"
    return out


def save_steps(rows: int, settings: dict[str, str], points: int) -> int:
    """Optimizer steps between two kept checkpoints: `points` an epoch, on epoch boundaries."""
    per_step = int(settings[BATCH]) * int(settings[ACCUMULATION])
    if rows % (per_step * points):
        raise SystemExit(
            f"--rows {rows} is not a multiple of {per_step} examples a step x {points} points "
            "an epoch: the checkpoints would not fall at equal shares of the data"
        )
    return rows // (per_step * points)


def arm_settings(fast_set: list[str]) -> dict[str, dict[str, str]]:
    from runner.recipe import flatten, load_recipe

    out = {}
    for arm, path in ARMS.items():
        out[arm] = optimization(flatten(load_recipe(ROOT / path).data))
    for item in fast_set:
        key, _, value = item.partition("=")
        out["adgen-fast"][key] = value
    return out


def label(arm: str, fast_set: list[str]) -> str:
    return " ".join([arm, *fast_set]) if arm == "adgen-fast" and fast_set else arm


def recipe_args(common: dict[str, str], settings: dict[str, str]) -> list[str]:
    args = ["run", TINY, "--until", "save"]
    for key, value in {**common, **settings}.items():
        args += ["--set", f"{key}={value}"]
    return args


def train_run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        sys.exit(f"recipe {' '.join(args)}: exit {done.returncode}: {' | '.join(tail)}")
    return time.perf_counter() - t0, done.stdout + done.stderr


def evaluate(runs: list[dict[str, Any]], common: dict[str, str]) -> float | None:
    """Every run's kept checkpoints on its dev rows (fills run["losses"]); the base's loss."""
    from datasets import load_from_disk
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    from runner.checkpoints import checkpoints
    from runner.models.load import load_base, load_tokenizer
    from runner.models.resolve import materialize
    from runner.recipe import load_recipe
    from runner.rundir import CHECKPOINTS, TOKENIZED
    from runner.stages.compare import mean_token_loss

    recipe = load_recipe(ROOT / TINY, [f"{k}={v}" for k, v in common.items()])
    folder = materialize(recipe, print)
    tok = load_tokenizer(folder)
    model: Any = None
    base = None
    for run in runs:
        run_dir = Path(run["run_dir"])
        data = load_from_disk(str(run_dir / TOKENIZED))["heldout"]
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data]
        run["heldout_rows"] = len(rows)
        kept = sorted(
            (step, path) for d in (run_dir / CHECKPOINTS).iterdir() for step, path in checkpoints(d)
        )
        if [s for s, _ in kept] != run["checkpoint_steps"]:
            sys.exit(
                f"{run_dir}: checkpoints {[s for s, _ in kept]}, {run['checkpoint_steps']} wanted"
            )
        for step, path in kept:
            if model is None:
                model = PeftModel.from_pretrained(load_base(recipe, folder), str(path)).eval()
                with model.disable_adapter():
                    base = mean_token_loss(model, tok, rows)
            else:
                result: Any = set_peft_model_state_dict(model, load_peft_weights(str(path)))
                if [k for k in result.missing_keys if "lora_" in k] or result.unexpected_keys:
                    sys.exit(f"{path}: the adapter does not match the first run's")
            run["losses"].append(round(mean_token_loss(model, tok, rows), 5))
            print(f"  {run['label']} seed {run['seed']} step {step}: {run['losses'][-1]:.4f}")
    return base


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--epochs", type=int, default=1, help="train.num_train_epochs, both arms")
    parser.add_argument("--rows", type=int, default=1152, help="training rows (train[:ROWS])")
    parser.add_argument("--points", type=int, default=4, help="held-out losses an epoch")
    parser.add_argument(
        "--fast-set", action="append", default=[], metavar="KEY=VALUE", help="adgen-fast arm only"
    )
    parser.add_argument("--work", type=Path, help="run directories (default: a temporary one)")
    args = parser.parse_args()
    # The benchmarks write their run directories into scratch folders and read this project's
    # templates, data and recipes: the person running a benchmark allows that (README: recipes
    # you did not write). Set here, not on import: tests import this module's helpers.
    os.environ.setdefault("RECIPE_ALLOW_PATHS", str(ROOT))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]  # the evaluation here too
    load_before, t_start = load(), time.perf_counter()

    arms = arm_settings(args.fast_set)
    data = {
        "dataset.split": f"train[:{args.rows}]",
        "dataset.heldout_split": "dev",
        "train.max_steps": "-1",
        "train.num_train_epochs": str(args.epochs),
        "train.eval_steps": "0",
        "train.save_total_limit": str(args.epochs * args.points),
    }
    for arm, settings in arms.items():
        print(f"{label(arm, args.fast_set)}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    runs = []
    for seed in args.seeds:
        for arm, settings in arms.items():
            every = save_steps(args.rows, settings, args.points)
            name = hashlib.sha256(json.dumps([settings, data, seed]).encode()).hexdigest()[:12]
            common = {
                **data,
                "recipe.seed": str(seed),
                "recipe.output_dir": str(work / f"{arm}-{seed}-{name}"),
                "train.save_steps": str(every),
                "train.logging_steps": str(every),
            }
            seconds, output = train_run(recipe_args(common, settings), env)
            state = json.loads((work / f"{arm}-{seed}-{name}/state/train.json").read_text())
            metrics = state["metrics"]
            run = {
                "arm": arm,
                "label": label(arm, args.fast_set),
                "seed": seed,
                "run_dir": common["recipe.output_dir"],
                "trained_now": "train: done" in output,
                "wall_s": round(seconds, 1),
                "train_s": metrics.get("train_runtime_s"),
                "steps": metrics["global_step"],
                "checkpoint_steps": [every * k for k in range(1, args.epochs * args.points + 1)],
                "train_loss": metrics.get("train_loss"),
                "losses": [],
            }
            runs.append(run)
            done = "trained" if run["trained_now"] else "up to date"
            print(f"{run['label']} seed {seed}: {run['steps']} steps, {done}, {seconds:.0f} s")

    print("held-out loss (dev, all rows) at each kept checkpoint:")
    base = evaluate(runs, {**data, "recipe.output_dir": str(work / "eval")})
    wall = time.perf_counter() - t_start

    points = [f"{(k + 1) / args.points:g} ep" for k in range(args.epochs * args.points)]
    width = max(len(r["label"]) for r in runs) + 2
    print(
        f"\ncpu: {len(os.sched_getaffinity(0))} cores, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
        f"load average {load_before} before, {load()} after; {wall:.0f} s in all"
    )
    print(f"base model (no adapter): {base:.4f}; {runs[0]['heldout_rows']} held-out rows\n")
    print(
        f"{'arm':<{width}}{'seed':>5}{'steps':>7}{'train s':>9}"
        + "".join(f"{p:>9}" for p in points)
    )
    for r in runs:
        losses = "".join(f"{x:>9.4f}" for x in r["losses"])
        print(
            f"{r['label']:<{width}}{r['seed']:>5}{r['steps']:>7}{r['train_s'] or 0:>9.1f}{losses}"
        )
    labels = list(dict.fromkeys(r["label"] for r in runs))
    final = {lb: [r["losses"][-1] for r in runs if r["label"] == lb] for lb in labels}
    paired = [f - a for f, a in zip(final[labels[1]], final[labels[0]], strict=True)]
    print(f"\nheld-out loss after {args.epochs} epoch(s), mean ± sd over seeds {args.seeds}:")
    for lb in labels:
        print(f"  {lb:<{width}}{spread(final[lb])}")
    print(f"  {labels[1]} - {labels[0]}, seed by seed: {spread(paired)}")
    verdict = "at least as good as" if statistics.mean(paired) <= 0 else "worse than"
    print(f"  {labels[1]}: {verdict} {labels[0]}")

    tried = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(["", *args.fast_set]))
    out = ROOT / "bench" / "results" / f"quality-{time.strftime('%Y-%m-%d')}{tried}.json"
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(sys.argv),
        "versions": versions(),
        "cpu": {"cores": len(os.sched_getaffinity(0)), "load_before": load_before},
        "epochs": args.epochs,
        "rows": args.rows,
        "common": data,
        "arms": {label(a, args.fast_set): s for a, s in arms.items()},
        "base_loss": round(base or 0.0, 5),
        "points": points,
        "runs": runs,
        "final_mean": {lb: statistics.mean(v) for lb, v in final.items()},
        "paired_difference": paired,
        "verdict": verdict,
    }
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0


def versions() -> dict[str, str]:
    from runner.plan import library_versions

    names = ("torch", "transformers", "peft", "bitsandbytes", "datasets")
    return {"python": sys.version.split()[0], **library_versions(names)}


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""GPU benchmark: the tutorial's configuration against the runner's fast configuration, on
ChatGLM3-6B's shape with random weights, both through the runner's own stages (recipe run).

    python bench/gpu.py [--steps-tutorial 12] [--steps 10] [--variants runner,runner-flex]

One call on a GPU machine: builds the 6B-shape GLM from a config with random weights (the
recipe option model.random_init), formats and tokenizes the shipped demo data (AdvertiseGen
length distribution), then for each configuration runs `recipe run --until train` and reads
the train stage's steady-state metrics. Prints real tokens/s, samples/s, padded tokens/s, peak
allocated/reserved GiB, useful MFU against a bf16 matmul ceiling it measures itself, the ratio
to the tutorial, and the device; writes bench/results/gpu-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ChatGLM3-6B (THUDM/chatglm3-6b config.json) in transformers' native GLM terms.
GLM_6B = {
    "model_type": "glm", "architectures": ["GlmForCausalLM"], "vocab_size": 65024,
    "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 28,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "partial_rotary_factor": 0.5, "attention_bias": True, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1,
}

# Recipe overrides per configuration, on top of recipes/adgen.toml.
CONFIGS: dict[str, list[str]] = {
    # The tutorial: every example padded to 512, batch 1 x accumulation 4, fp16, checkpointing,
    # peft's fp32 upcast. (fp16 autocast with an fp16 compute dtype: the tutorial's fp16 with a
    # bf16 compute dtype is refused by the recipe validator as a dtype mix.)
    "tutorial": ["tokenize.max_length=512", "train.padding=max_length",
                 "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=4",
                 "train.fp16=true", "train.bf16=false", "train.gradient_checkpointing=true",
                 "quantization.bnb_4bit_compute_dtype=float16", "quantization.upcast_to_fp32=true",
                 "train.packing=false"],
    # The runner's fast path: examples packed into long rows (position ids restart per example),
    # 32 examples per micro-batch, bf16, non-reentrant checkpointing, no fp32 upcast.
    "runner-sdpa": ["train.packing=true", "train.per_device_train_batch_size=32",
                    "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=true",
                    "model.attn_implementation=sdpa"],
    "runner": ["train.packing=true", "train.per_device_train_batch_size=32",
               "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=true",
               "model.attn_implementation=flex_attention"],
    "runner-b64": ["train.packing=true", "train.per_device_train_batch_size=64",
                   "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=true",
                   "model.attn_implementation=flex_attention"],
    "runner-b128": ["train.packing=true", "train.per_device_train_batch_size=128",
                    "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=true",
                    "model.attn_implementation=flex_attention"],
}


SMOKE = dict(GLM_6B, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, head_dim=32, vocab_size=4000)


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


def recipe_file(work: Path, model: Path, steps: int) -> Path:
    """recipes/adgen.toml with the model and data swapped for local ones."""
    import tomllib

    import tomli_w

    data = tomllib.loads((ROOT / "recipes" / "adgen.toml").read_text(encoding="utf-8"))
    data["model"] = {"name_or_path": str(model), "random_init": True}
    data["dataset"] = {"path": str(ROOT / "data" / "adgen-demo"), "split": "train",
                       "heldout_split": "dev[:8]"}
    data["template"] = {k: str((ROOT / "recipes" / v).resolve()) for k, v in data["template"].items()}
    data["compare"] = {"num_examples": 0}
    data["train"].update(max_steps=steps, save_steps=100000, logging_steps=1, report_to="none")
    path = work / "bench-6b.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


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


def run_config(name: str, recipe: Path, work: Path, steps: int) -> dict[str, Any]:
    run_dir = work / "runs" / name
    cmd = [sys.executable, "-m", "runner.cli", "run", str(recipe), "--until", "train",
           "--set", f"recipe.output_dir={run_dir}", "--set", f"train.max_steps={steps}",
           *[x for o in CONFIGS[name] for x in ("--set", o)]]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
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
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/recipe-bench", type=Path)
    parser.add_argument("--steps-tutorial", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="runner-sdpa,runner")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on the CPU: checks the flow")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")))
    args = parser.parse_args()

    import torch

    os.environ.setdefault("RECIPE_CACHE", str(args.work / "cache"))
    args.work.mkdir(parents=True, exist_ok=True)
    model = prepare(args.work, SMOKE if args.smoke else GLM_6B)
    recipe = recipe_file(args.work, model, args.steps)
    ceiling = matmul_ceiling() if torch.cuda.is_available() else float("nan")
    params = 6.24e9
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": dt.date.today().isoformat(),
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft",
                                                             "bitsandbytes", "datasets")},
        "matmul_ceiling_tflops": round(ceiling, 1), "configs": {},
    }
    for name in ["tutorial", *[v for v in args.variants.split(",") if v]]:
        steps = args.steps_tutorial if name == "tutorial" else args.steps
        m = run_config(name, recipe, args.work, steps)
        if "real_tokens_per_second" in m:
            # LoRA on a frozen base: forward 2N + input-gradient backward 2N FLOPs per token.
            m["useful_mfu"] = round(4 * params * m["real_tokens_per_second"] / (ceiling * 1e12), 4)
        results["configs"][name] = m
        print(name, json.dumps({k: v for k, v in m.items() if k != "losses"}), flush=True)
    curves = {n: m.get("losses") for n, m in results["configs"].items() if m.get("losses")}
    if "runner" in curves and "runner-sdpa" in curves:
        diff = max(abs(a - b) for a, b in zip(curves["runner"], curves["runner-sdpa"]))
        results["flex_vs_sdpa_max_loss_diff"] = round(diff, 5)
        print(f"numerics: flex_attention vs sdpa (same batches), max |loss diff| over "
              f"{len(curves['runner'])} steps: {diff:.5f}")
    base = results["configs"]["tutorial"].get("real_tokens_per_second")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"gpu-{results['date']}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\ndevice {results['device']}; bf16 matmul ceiling {ceiling:.0f} TFLOP/s; results {out}")
    print(f"{'config':<16}{'real tok/s':>11}{'x tutorial':>11}{'samples/s':>10}{'padded tok/s':>13}"
          f"{'peak alloc':>11}{'reserved':>9}{'MFU':>7}")
    for name, m in results["configs"].items():
        if "error" in m:
            print(f"{name:<16} failed: {m['error'][:200]}")
            continue
        ratio = m["real_tokens_per_second"] / base if base else float("nan")
        print(f"{name:<16}{m['real_tokens_per_second']:>11.0f}{ratio:>11.1f}{m['samples_per_second']:>10.2f}"
              f"{m['padded_tokens_per_second']:>13.0f}{m.get('peak_allocated_gib', float('nan')):>11.1f}"
              f"{m.get('peak_reserved_gib', float('nan')):>9.1f}{m['useful_mfu']:>7.1%}")


if __name__ == "__main__":
    main()

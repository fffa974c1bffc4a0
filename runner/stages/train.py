"""train: HF Trainer on the tokenized rows, checkpoints per attempt, resumable, interruptible."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from runner.checkpoints import attempt_dir, newest_valid, other_attempts
from runner.context import Context
from runner.errors import Interrupted
from runner.state import write_json_atomic

# Keys of [train] that go to TrainingArguments unchanged.
PASSTHROUGH = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
    "learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "optim", "fp16",
    "logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers",
)


def versioned_arguments(cfg: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """Recipe names that transformers renamed between 4.x and 5.x, mapped to what is installed."""
    out: dict[str, Any] = {}
    if "warmup_ratio" in fields:
        out["warmup_ratio"] = cfg["warmup_ratio"]
    elif cfg["warmup_ratio"]:
        out["warmup_steps"] = float(cfg["warmup_ratio"])  # 5.x: a float in [0, 1) is a ratio
    if "group_by_length" in fields:
        out["group_by_length"] = cfg["group_by_length"]
    elif cfg["group_by_length"]:
        out["train_sampling_strategy"] = "group_by_length"
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    out[ckpt] = cfg["gradient_checkpointing"]
    out[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    return out


def training_arguments(ctx: Context, output_dir: str) -> Any:
    import dataclasses

    import torch
    from transformers import TrainingArguments

    recipe = ctx.recipe
    cfg = recipe.section("train")
    bf16 = cfg["bf16"]
    if bf16 == "auto":
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = {k: cfg[k] for k in PASSTHROUGH} | versioned_arguments(cfg, fields)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.path("logs/tensorboard"))
    return TrainingArguments(
        output_dir=output_dir,
        bf16=bf16,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to=[] if cfg["report_to"] == "none" else [cfg["report_to"]],
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        save_strategy="steps",
        eval_strategy="no",
        **kwargs,
    )


def make_callback(ctx: Context, stop_flag: dict[str, bool]) -> Any:
    from transformers import TrainerCallback

    class RunnerCallback(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                ctx.log(f"train: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                        f"lr {logs.get('learning_rate', 0):.2e}")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if stop_flag["stop"]:
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ctx.on_progress({"last_checkpoint_step": state.global_step})

    return RunnerCallback()


def interrupt_flag() -> tuple[dict[str, bool], Any]:
    """First SIGINT/SIGTERM asks for a checkpoint and a clean stop; a second one stops at once."""
    flag = {"stop": False}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\ninterrupt: saving a checkpoint after this step (again to stop at once)",
              file=sys.stderr)

    for s in previous:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return flag, restore


def run(ctx: Context) -> dict[str, Any]:
    import torch
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer

    from runner.models.load import load_for_training, load_tokenizer
    from runner.models.resolve import materialize

    recipe = ctx.recipe
    folder = materialize(recipe, ctx.log)
    tok = load_tokenizer(folder)
    model = ctx.memo.pop("model", None)
    if model is None:
        model, _ = load_for_training(recipe, folder)
    fp = ctx.fingerprint
    out_dir = attempt_dir(ctx.run_dir, fp)
    resume, skipped = newest_valid(out_dir)
    for note in skipped:
        ctx.log(f"train: {note}")
    if resume is not None:
        ctx.log(f"train: resumed from checkpoint {resume.name.split('-')[-1]} ({resume})")
    elif other_attempts(ctx.run_dir, fp):
        ctx.log("train: starting fresh; checkpoints of earlier attempts were made with other "
                f"settings and are not resumed: {', '.join(other_attempts(ctx.run_dir, fp))}")
    data = load_from_disk(str(ctx.path("data/tokenized")), keep_in_memory=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100,
                                      pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    flag, restore = interrupt_flag()
    trainer = Trainer(model=model, args=training_arguments(ctx, str(out_dir)), train_dataset=data["train"],
                      data_collator=collator, callbacks=[make_callback(ctx, flag)])
    trainer.remove_callback(PrinterCallback)  # our callback logs instead of printing dicts
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        restore()
    if flag["stop"]:
        ctx.log(f"train: interrupted at step {trainer.state.global_step}; checkpoint saved, "
                "`recipe run` resumes")
        raise Interrupted("train")
    trainer.save_model(str(ctx.path("train/final")))
    history = trainer.state.log_history
    write_json_atomic(ctx.path("train/log_history.json"), history)
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = sum(len(x) for x in data["train"]["input_ids"])
    metrics = {
        "global_step": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed_from": resume.name if resume else None,
        "epochs": result.metrics.get("epoch"),
        "dataset_tokens": tokens,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "real_tokens_per_second": round(trainer.state.num_input_tokens_seen
                                        / max(result.metrics.get("train_runtime") or 1e-9, 1e-9), 1),
    }
    ctx.log(f"train: {metrics['global_step']} steps, loss {metrics['first_logged_loss']} -> "
            f"{metrics['last_logged_loss']}")
    return metrics


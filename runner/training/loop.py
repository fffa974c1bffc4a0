"""The training run: the Trainer on the tokenized rows from a given resume point, checkpoints
in the attempt folder, interruptible, and the stage's metrics.

The one-process train stage (runner/stages/train.py) and every launched worker
(runner/worker.py) call `train` with a ResumePoint decided before (runner.training.attempts.
start_attempt, by the stage or by the launcher for all workers): no process decides twice, and
no worker can launch again.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import faults, profiling
from runner.checkpoints import (
    SHARDED,
    SHARDED_OPTIMIZER,
    attempt_dir,
    checkpoint_problem,
    newest_valid,
    step_of,
)
from runner.context import Context
from runner.errors import Interrupted, RecipeError, StageError
from runner.precision import for_recipe
from runner.progress import TrainProgress
from runner.recipe import Recipe
from runner.rundir import LOG_HISTORY, LOGS, STOP_FILE, TENSORBOARD, TOKENIZED, TRAIN_FINAL
from runner.state import is_disk_full, path_size, write_json_atomic
from runner.throughput import Meter, counting
from runner.training.attempts import read_attempt, write_attempt

if TYPE_CHECKING:
    from runner.models.estimate import ModelPlan
    from runner.models.fit import Layout


@dataclass(frozen=True)
class ResumePoint:
    """Where a training run starts: a complete checkpoint of this attempt, or (None) step 0."""

    checkpoint: Path | None


# Keys of [train] that go to TrainingArguments unchanged.
PASSTHROUGH = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "fp16",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "dataloader_num_workers",
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
    ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    # "auto" and a layer count: the model's layers were set up when it loaded and the train stage
    # picks them; the Trainer switching checkpointing on would put every layer back.
    out[ckpt] = cfg["gradient_checkpointing"] is True
    out[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    return out


def training_arguments(ctx: Context, output_dir: str) -> Any:
    import dataclasses

    import torch
    from transformers import TrainingArguments

    from runner.training.trainer import one_gpu_per_process

    recipe = ctx.recipe
    cfg = recipe.section("train")
    precision = for_recipe(recipe)  # runner/precision.py: what the plan printed
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = {k: cfg[k] for k in PASSTHROUGH} | versioned_arguments(cfg, fields)
    if ctx.world_size > 1:  # LoRA on every target layer: each trainable parameter gets a grad
        kwargs["ddp_find_unused_parameters"] = False
        kwargs["ddp_broadcast_buffers"] = False  # constant buffers (rotary): no sync per step
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.path(TENSORBOARD))
    args = TrainingArguments(
        output_dir=output_dir,
        bf16=precision.bf16,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to=[] if cfg["report_to"] == "none" else [cfg["report_to"]],
        include_num_input_tokens_seen="non_padding",
        # The filter tests each micro-batch's loss for NaN on the CPU: a sync per micro-batch.
        # Without it a NaN loss is logged as NaN instead of being replaced by the average.
        logging_nan_inf_filter=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,  # runner.progress draws the bar
        remove_unused_columns=False,
        save_strategy="steps",
        **evaluation_arguments(cfg),
        **kwargs,
    )
    return one_gpu_per_process(args)


def evaluation_arguments(cfg: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss every eval_steps; early stopping on it (the adapter kept is the last one,
    so save_steps, which does not change the result, stays free of eval_steps)."""
    if not cfg["eval_steps"]:
        return {"eval_strategy": "no"}
    out: dict[str, Any] = {
        "eval_strategy": "steps",
        "eval_steps": cfg["eval_steps"],
        "prediction_loss_only": True,
        "per_device_eval_batch_size": cfg["per_device_train_batch_size"],
    }
    if cfg["early_stopping_patience"]:
        out |= {
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
            "restore_callback_states_from_checkpoint": True,
        }  # patience survives a resume
    return out


def agreed_stop(ctx: Context, stop_flag: dict[str, bool], device: Any) -> bool:
    """Whether to stop after this step. In a launched run the parent asks by writing the stop
    file; every rank must stop after the same step, so the ranks agree (an all-reduce)."""
    if ctx.world_size == 1:
        return stop_flag["stop"]
    import torch
    import torch.distributed as dist

    local = stop_flag["stop"] or ctx.path(STOP_FILE).exists()
    vote = torch.tensor([int(local)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    stop_flag["stop"] = bool(vote.item())
    return stop_flag["stop"]


def make_callback(
    ctx: Context, stop_flag: dict[str, bool], meter: Meter, progress: TrainProgress
) -> Any:
    from transformers import TrainerCallback

    class RunnerCallback(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if ctx.is_main:
                progress.start(state.max_steps, state.global_step, state.num_input_tokens_seen)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and ctx.is_main:
                progress.logged(state.global_step, logs)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.step()
            if ctx.is_main:
                progress.step(state.global_step, state.num_input_tokens_seen)
            if agreed_stop(ctx, stop_flag, args.device):
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if ctx.is_main:
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
        print(
            "\ninterrupt: saving a checkpoint after this step (again to stop at once)",
            file=sys.stderr,
        )

    for s in previous:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return flag, restore


def disk_full(out_dir: Path, step: int, error: BaseException) -> StageError:
    """The checkpoint being written is removed; the previous one and the state stay as they were."""
    partial = out_dir / f"checkpoint-{step}"
    saving = partial.is_dir() and checkpoint_problem(partial) is not None
    if saving:
        shutil.rmtree(partial, ignore_errors=True)
    previous, _ = newest_valid(out_dir)
    free = shutil.disk_usage(out_dir if out_dir.is_dir() else out_dir.parent).free
    need = path_size(previous) if previous is not None else None
    needs = f", a checkpoint needs about {need / 2**20:.1f} MiB" if need else ""
    resumes = f"resumes from checkpoint {step_of(previous)}" if previous else "starts over"
    where = (
        f"saving checkpoint {step} to {partial}"
        if saving
        else f"writing {getattr(error, 'filename', None) or out_dir} at step {step}"
    )
    return StageError(
        "train",
        f"disk full while {where} ({free / 2**20:.1f} MiB free{needs}); "
        f"free space and run again (it {resumes})",
    )


def is_last_step(checkpoint: Path) -> bool:
    import json

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return bool(state.get("max_steps")) and state["global_step"] >= state["max_steps"]


def reuse_last_checkpoint(
    ctx: Context, trainer: Any, checkpoint: Path, out_dir: Path, fsdp: bool = False
) -> dict[str, Any]:
    """Training had finished (its state file was lost or corrupt): resuming from the last step's
    checkpoint would train one step past max_steps (transformers checks after a step), so take
    its weights and log as they are."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import TrainerState

    if fsdp and (checkpoint / SHARDED).is_dir():
        # No adapter file, and the shards load only into the wrapped model: wrap it as train()
        # would, so that save_final gathers it the same way.
        trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
        restore_sharded(ctx, trainer, checkpoint, optimizer=False)
    else:
        set_peft_model_state_dict(trainer.model, load_peft_weights(str(checkpoint)))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    ctx.log(f"train: checkpoint {step_of(checkpoint)} is the last step; nothing left to train")
    save_final(ctx, trainer, fsdp)
    history = trainer.state.log_history
    if ctx.is_main:
        write_attempt(out_dir, {**(read_attempt(out_dir) or {}), "finished": True})
        write_json_atomic(ctx.path(LOG_HISTORY), history)
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "global_step": trainer.state.global_step,
        "resumed_from": checkpoint.name,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "tokens_seen": trainer.state.num_input_tokens_seen,
    }


def merged_meter(ctx: Context, meter: Meter) -> dict[str, Any]:
    """The throughput of all ranks: rates summed, memory the largest of any GPU."""
    if ctx.world_size == 1:
        return meter.summary()
    import torch.distributed as dist

    # The ranks step in lockstep: a step where any rank compiled for a new length is slow for
    # all of them, so every rank leaves out the union of those steps.
    compiled: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(compiled, sorted(meter.new_shape_steps))
    summary = meter.summary(set().union(*map(set, compiled)))
    every: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(every, summary)
    merged = dict(summary)
    for key in ("real_tokens_per_second", "padded_tokens_per_second", "samples_per_second"):
        if all(key in s for s in every):
            merged[key] = round(sum(s[key] for s in every), 3)
            merged[f"{key}_per_process"] = [s[key] for s in every]
    for key in ("peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib"):
        if all(key in s for s in every):
            merged[key] = max(s[key] for s in every)
            merged[f"{key}_per_process"] = [s[key] for s in every]
    merged["processes"] = ctx.world_size
    return merged


def fsdp_ready(trainer: Any) -> bool:
    """FSDP-QLoRA: peft's wrap policy puts the trainable adapters in units of their own (flat
    parameters must not mix frozen and trainable tensors), and peft finds the adapter's keys
    under those nested wrappers (runner/models/fsdp_names.py). True when FSDP is on."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return False
    from peft.utils.other import fsdp_auto_wrap_policy

    from runner.training.trainer import clean_fsdp_prefixes

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    clean_fsdp_prefixes()
    return True


def restore_sharded(ctx: Context, trainer: Any, checkpoint: Path, optimizer: bool) -> None:
    """The LoRA weights (and the optimizer state) of an FSDP-sharded checkpoint, into the wrapped
    model on every rank; the Trainer's own load leaves both at init (models/fsdp_names.py)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from runner.models.fsdp_names import load_sharded_adapter, load_sharded_optimizer

    plugin = trainer.accelerator.state.fsdp_plugin
    states = 0
    try:
        n = load_sharded_adapter(trainer.model_wrapped, plugin, checkpoint / SHARDED)
        if optimizer:
            states = load_sharded_optimizer(
                trainer.model_wrapped, trainer.optimizer, plugin, checkpoint / SHARDED_OPTIMIZER
            )
    # dist_cp's CheckpointException (a BaseException) carries every rank's traceback: first line
    except (ValueError, CheckpointException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(
            "train",
            f"checkpoint {step_of(checkpoint)} ({checkpoint}) cannot be restored: {reason}; "
            f"delete {checkpoint} to resume from an earlier one or start over",
        ) from e
    also = f" and the optimizer state of {states} parameters" if optimizer else ""
    ctx.log(f"train: FSDP: {n} LoRA tensors{also} restored from checkpoint {step_of(checkpoint)}")


def sharded_resume_hook(ctx: Context, trainer: Any, checkpoint: Path) -> Any:
    """Restores adapter and optimizer once the Trainer has wrapped the model and run its own
    resume (step, schedule, rng), before the first step."""
    from transformers import TrainerCallback

    class RestoreSharded(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            restore_sharded(ctx, trainer, checkpoint, optimizer=True)

    return RestoreSharded()


def save_final(ctx: Context, trainer: Any, fsdp: bool) -> None:
    """The adapter, by every rank (FSDP gathers the shards); written by rank 0, which checks
    under FSDP that the file holds tensors (peft filters the gathered state dict by name)."""
    folder = ctx.path(TRAIN_FINAL)
    if fsdp:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(folder))
    if fsdp and ctx.is_main and adapter_tensors(folder) == 0:
        import peft

        raise StageError(
            "train",
            f"the adapter saved to {folder} holds no tensors: peft {peft.__version__} did not "
            "find the adapter's weights under FSDP's wrappers (checked with peft 0.21.0); "
            'install peft==0.21.0 or set launch.strategy = "ddp"',
        )


def adapter_tensors(folder: Path) -> int:
    """How many tensors the saved adapter holds (0 when there is no safetensors file)."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return 0
    with safe_open(str(path), "np") as f:
        return len(list(f.keys()))


def refuse_impossible_compile(recipe: Recipe, cuda: bool) -> None:
    """train.torch_compile that cannot work here: RecipeError, before anything is loaded."""
    from runner.models.compile import compile_problem, compile_wanted

    if compile_wanted(recipe, cuda) and (problem := compile_problem(recipe, cuda)):
        raise RecipeError(problem)


def memory_layout(ctx: Context, model: Any, cuda: bool) -> MemoryPlan:
    """Which decoder layers are checkpointed and whether the loss is chunked: the recipe's
    settings, or "auto" resolved against the GPU's memory (runner/models/fit.py). Applied to
    the model; the line saying what and why is logged."""
    from runner.models import fit
    from runner.models.compile import repeated_layers
    from runner.models.estimate import plan_model
    from runner.models.load import hardware

    recipe = ctx.recipe
    plan = None
    if cuda:
        try:
            budget = fit.gpu_budget(recipe)
            plan = plan_model(recipe, cuda=True, bf16_ok=hardware()[1], budget=budget)
        except RecipeError as e:
            if fit.checkpointing_auto(recipe, cuda) or fit.chunking_auto(recipe, cuda):
                ctx.log(f"train: no memory estimate for this model ({e}); every layer checkpointed")
    if plan is not None:
        choice = plan.choice
        if choice.auto:
            ctx.log(f"train: {choice.describe()}")
        layout = choice.layout
    else:
        from runner.models.chunked_loss import chunking_wanted

        layers = len(repeated_layers(model))
        layout = fit.Layout(
            fit.fixed_checkpointed(recipe, layers),
            layers,
            "threshold" if chunking_wanted(recipe, cuda) else "off",
            0,
            0,
        )
    if problem := fit.apply(model, layout):
        ctx.log(f"train: {problem}")
    return MemoryPlan(layout, plan)


@dataclass(frozen=True)
class MemoryPlan:
    """The layout a run trains with, and the estimate that priced it (None: not on a GPU)."""

    layout: Layout
    plan: ModelPlan | None

    def measured(self, shapes: set[tuple[int, ...]]) -> dict[str, Any]:
        """The estimate for the longest micro-batch that trained, beside the planned one, for
        the train stage's metrics (next to peak_allocated_gib, what torch measured)."""
        if self.plan is None or not shapes:
            return {}
        batch, length = max(shapes, key=lambda s: s[0] * s[-1])[0], max(s[-1] for s in shapes)
        layout = self.layout
        estimate = self.plan.memory.step(
            batch * length, length, layout.checkpointed, layout.chunking, device_heap=True
        )
        return {
            "checkpointed_layers": layout.checkpointed,
            "layers": layout.layers,
            "loss_chunking": layout.chunking,
            "planned_tokens": self.plan.tokens.batch * self.plan.tokens.peak_length,
            "planned_peak_gib": round(layout.peak / 2**30, 3),
            "longest_batch": [batch, length],
            "estimated_peak_gib": round(estimate / 2**30, 3),
            "budget_gib": (
                round(self.plan.choice.budget / 2**30, 3) if self.plan.choice.budget else None
            ),
        }


def train(ctx: Context, resume: ResumePoint) -> dict[str, Any]:
    """Train from `resume` (decided before: runner.training.attempts.start_attempt); the
    stage's metrics. Every process of a launched run calls this with the same resume point."""
    import torch
    from datasets import load_from_disk
    from transformers import EarlyStoppingCallback, PrinterCallback

    from runner.data.collate import Packed, make_collator
    from runner.models.compile import compile_layers, compile_wanted
    from runner.models.load import load_for_training, load_tokenizer
    from runner.models.resolve import materialize
    from runner.training.trainer import (
        RunnerTrainer,
        chunk_the_loss,
        keep_training_layout,
        no_ddp_graph_splitting,
    )

    recipe = ctx.recipe
    cuda = torch.cuda.is_available()
    refuse_impossible_compile(recipe, cuda)
    folder = materialize(recipe, ctx.log)
    tok = load_tokenizer(folder)
    model, ctx.model = ctx.model, None
    out_dir = attempt_dir(ctx.run_dir, ctx.fingerprint)
    args = training_arguments(ctx, str(out_dir))
    if model is None:
        model, _ = load_for_training(recipe, folder)
    memory_plan = memory_layout(ctx, model, cuda)  # before compiling: it picks the layers
    if compile_wanted(recipe, cuda):
        no_ddp_graph_splitting()
        ctx.log(f"train: {compile_layers(model)}")
    if memory_plan.layout.chunked:
        ctx.log(f"train: {chunk_the_loss(model, always=memory_plan.layout.chunking == 'always')}")
    checkpoint = resume.checkpoint
    data = load_from_disk(str(ctx.path(TOKENIZED)), keep_in_memory=True)
    collator = make_collator(recipe, tok)
    cfg = recipe.section("train")
    flag, restore = interrupt_flag() if ctx.world_size == 1 else ({"stop": False}, lambda: None)
    meter = Meter(tok.pad_token_id)
    progress = TrainProgress(ctx.log)
    echo, ctx.echo = ctx.echo, progress.printer(ctx.echo)  # lines above the bar on a terminal
    callbacks = [make_callback(ctx, flag, meter, progress)]
    if cfg["early_stopping_patience"]:
        callbacks.append(
            EarlyStoppingCallback(cfg["early_stopping_patience"], cfg["early_stopping_threshold"])
        )
    trainer = RunnerTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["heldout"] if cfg["eval_steps"] else None,
        data_collator=counting(collator, meter),
        callbacks=callbacks,
        meter=meter,
        packed=collator if isinstance(collator, Packed) else None,
    )
    trainer.remove_callback(PrinterCallback)  # our callback logs instead of printing dicts
    if cfg["packing"] and ctx.world_size > 1 and not cfg["group_by_length"]:
        ctx.log(trainer.balance(recipe.seed))
    fsdp = fsdp_ready(trainer)
    if fsdp and checkpoint is not None and (checkpoint / SHARDED).is_dir():
        trainer.callback_handler.callbacks.insert(0, sharded_resume_hook(ctx, trainer, checkpoint))
    for hook in faults.trainer_hooks(
        trainer,
        ctx.run_dir,  # tests only
        lambda: flag["stop"] or ctx.path(STOP_FILE).exists(),
    ):
        trainer.callback_handler.callbacks.insert(0, hook)
    for hook in profiling.trainer_hooks(ctx.path(LOGS), ctx.rank):  # benchmarks only
        trainer.add_callback(hook)
    if cfg["eval_steps"]:
        keep_training_layout(model)
    if checkpoint is not None and is_last_step(checkpoint):
        ctx.echo = echo
        restore()
        return reuse_last_checkpoint(ctx, trainer, checkpoint, out_dir, fsdp)
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(out_dir, trainer.state.global_step, e) from e
        raise
    finally:
        progress.stop()
        ctx.echo = echo
        restore()
    if flag["stop"]:
        ctx.stopped_at_step = trainer.state.global_step
        ctx.log(
            f"train: interrupted at step {trainer.state.global_step}; checkpoint saved, "
            "`recipe run` resumes"
        )
        raise Interrupted("train")
    if cfg["early_stopping_patience"] and trainer.state.global_step < trainer.state.max_steps:
        ctx.log(
            f"train: stopped early at step {trainer.state.global_step}: the held-out loss did "
            f"not improve for {cfg['early_stopping_patience']} evaluations "
            f"(best {trainer.state.best_metric or float('nan'):.4f})"
        )
    save_final(ctx, trainer, fsdp)
    throughput = merged_meter(ctx, meter)
    history = trainer.state.log_history
    if ctx.is_main:
        write_attempt(out_dir, {**(read_attempt(out_dir) or {}), "finished": True})
        write_json_atomic(ctx.path(LOG_HISTORY), history)
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = sum(len(x) for x in data["train"]["input_ids"])
    metrics = {
        "global_step": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed_from": checkpoint.name if checkpoint else None,
        "epochs": result.metrics.get("epoch"),
        "dataset_tokens": tokens,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        **throughput,
        "average_tokens_per_second": round(
            trainer.state.num_input_tokens_seen
            / max(result.metrics.get("train_runtime") or 1e-9, 1e-9),
            1,
        ),
    }
    if cuda:
        metrics["memory_estimate"] = memory_plan.measured(meter.shapes)
    ctx.log(
        f"train: {metrics['global_step']} steps, loss {metrics['first_logged_loss']} -> "
        f"{metrics['last_logged_loss']}"
    )
    return metrics

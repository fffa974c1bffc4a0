"""Every place the runner changes a library's own behaviour, in one module.

`RunnerTrainer` is transformers' Trainer with the runner's overrides as methods; the overrides
outside the Trainer (a TrainingArguments field, a bitsandbytes layer attribute, a peft private
function, a dynamo setting, the model's loss hook and output head) are the functions below,
applied by the training loop through this module and nowhere else. OVERRIDES names each
library name they rely on; tests/test_architecture.py checks them all against the installed
libraries, and each override checks its own at run time: a library that renamed or dropped one
stops the run with a line naming the library's version, never a quiet change of behaviour.

Imports transformers at module level: import it only inside a stage (runner.training.loop).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NoReturn

from transformers import Trainer

from runner.data.balance import BalancedBatches
from runner.data.collate import Packed, real_token_mask
from runner.errors import StageError
from runner.models import chunked_loss
from runner.models.load import unwrapped
from runner.throughput import Meter


@dataclass(frozen=True)
class Override:
    """One library name the runner replaces or sets: `module.Owner.attribute` (or
    `module.attribute`), the distribution it belongs to and why."""

    library: str
    target: str
    why: str
    # builds an object that must have the attribute, for one set on instances only (in __init__)
    sample: Callable[[], Any] | None = None

    def version(self) -> str:
        try:
            return metadata.version(self.library)
        except metadata.PackageNotFoundError:
            return "(not installed)"


def _training_arguments() -> Any:
    import tempfile

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), use_cpu=True, report_to=[])
    _ = args.n_gpu  # sets _n_gpu, the field an instance has once its devices are set up
    return args


def _linear4bit() -> Any:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(8, 8)  # not quantized until moved to a GPU: cheap


TRAINING_STEP = Override(
    "transformers",
    "transformers.Trainer.training_step",
    "a batch counts for throughput in the step that trains it, not when collated ahead",
)
EVALUATION_LOOP = Override(
    "transformers",
    "transformers.Trainer.evaluation_loop",
    "held-out batches, collated by the training collator, are not training throughput",
)
TRAIN_DATALOADER = Override(
    "transformers",
    "transformers.Trainer.get_train_dataloader",
    "packed rows on several processes: equal tokens per process per step",
)
SAVE_MODEL = Override(
    "transformers",
    "transformers.Trainer.save_model",
    "test-only fault injection dies between a checkpoint's model files and the rest",
)
TRACK_TOKENS = Override(
    "transformers",
    "transformers.Trainer._track_num_input_tokens",
    "tokens seen leave a packed row's pad segment out, and are counted on the CPU (the "
    "Trainer's count reads a GPU sum back: a sync every micro-batch)",
)
N_GPU = Override(
    "transformers",
    "transformers.TrainingArguments._n_gpu",
    "one process trains on one GPU, never nn.DataParallel over all of them",
    sample=_training_arguments,
)
LOSS_FUNCTION = Override(
    "transformers",
    "transformers.PreTrainedModel.loss_function",
    "train.chunked_cross_entropy: the loss computed from hidden states a chunk at a time",
)
HEAD_FORWARD = Override(
    "torch",
    "torch.nn.Linear.forward",
    "train.chunked_cross_entropy: the output head passes hidden states through to the loss",
)
CPU_REPACK = Override(
    "bitsandbytes",
    "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu",
    "evaluation during training must not repack 4-bit weights for the CPU inference kernel",
    sample=_linear4bit,
)
FSDP_PREFIXES = Override(
    "peft",
    "peft.tuners.tuners_utils._get_tuner_state_dict_key_prefixes",
    "FSDP-QLoRA: peft finds the adapter's keys under FSDP's nested wrapper names",
)
OPTIMIZE_DDP = Override(
    "torch",
    "torch._dynamo.config.optimize_ddp",
    "layers compiled one by one are not split again at DDP's gradient buckets",
)
OVERRIDES = (
    TRAINING_STEP,
    EVALUATION_LOOP,
    TRAIN_DATALOADER,
    SAVE_MODEL,
    TRACK_TOKENS,
    N_GPU,
    LOSS_FUNCTION,
    HEAD_FORWARD,
    CPU_REPACK,
    FSDP_PREFIXES,
    OPTIMIZE_DDP,
)


def _has(owner: Any, name: str) -> bool:
    fields = getattr(owner, "__dataclass_fields__", {})
    return name in fields or hasattr(owner, name)


def missing(override: Override) -> str | None:
    """Why the installed library lacks the override's target (None: it has it)."""
    parts = override.target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        break
    else:
        return f"{parts[0]} cannot be imported"
    for i, name in enumerate(parts[cut:], start=cut):
        last = i == len(parts) - 1
        if last and override.sample is not None:
            owner = override.sample()
        if not _has(owner, name):
            return f"no {'.'.join(parts[: i + 1])}"
        if not last:
            owner = getattr(owner, name)
    return None


def require(override: Override) -> None:
    """Stop the run (StageError, one line) when the library lacks the override's target."""
    if (problem := missing(override)) is not None:
        stop(override, problem)


def stop(override: Override, problem: str | None = None) -> NoReturn:
    """The one line for an override whose target the installed library lacks."""
    problem = problem or missing(override) or f"no {override.target}"
    raise StageError(
        "train",
        f"{override.library} {override.version()} has {problem}, which the runner overrides "
        f"({override.why}); install a version pyproject.toml lists "
        "(see docs/compatibility.md)",
    )


class RunnerTrainer(Trainer):  # type: ignore[misc]
    """transformers' Trainer with the runner's overrides, each a method here.

    `meter` counts throughput (runner/throughput.py); `packed` is the packing collator whose
    pad segment tokens-seen leaves out, or None; `balance` (after construction) gives the
    training data loader BalancedBatches (runner/data/balance.py); `after_save` hooks run after
    every save_model (fault injection)."""

    def __init__(self, *args: Any, meter: Meter, packed: Packed | None = None, **kwargs: Any):
        for override in (
            TRAINING_STEP,
            EVALUATION_LOOP,
            TRAIN_DATALOADER,
            SAVE_MODEL,
            TRACK_TOKENS,
        ):
            require(override)
        self.meter = meter
        self.packed = packed
        self.balanced: BalancedBatches | None = None
        self.after_save: list[Callable[[str | None], None]] = []  # runner/faults.py only
        super().__init__(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Called once per micro-batch as it is trained: the oldest collated batch counts now
        (the data loader collates ahead; counting then gave each step the next one's batch)."""
        self.meter.trained()
        return super().training_step(*args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The evaluation loop collates held-out batches synchronously with the training
        collator: the meter ignores them while it runs."""
        self.meter.paused = True
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self.meter.paused = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model's files (a checkpoint's adapter, or the final one), then `after_save`: a
        test can kill the process with the weights on disk and the optimizer state not yet."""
        super().save_model(output_dir, _internal_call)
        for hook in self.after_save:
            hook(output_dir)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> Any:
        """transformers 5 counts "non_padding" tokens from the attention mask, else input_ids
        against the tokenizer's pad id (the runner's Trainer has none: every token, and a warning
        at every step); a packed batch has no attention mask, so it gets the real-token mask.
        The count is a GPU sum read back by the CPU, which waits for the step's backward pass
        each micro-batch; one process that collated the batch itself has the same count from
        the collator (the meter's) and adds that instead."""
        if self.args.world_size == 1 and self.meter.last_real is not None:
            self.state.num_input_tokens_seen += self.meter.last_real
            return None
        if self.packed is None:
            return super()._track_num_input_tokens(inputs)
        mask = real_token_mask(inputs, self.packed.pad_id, self.packed.multiple)
        return super()._track_num_input_tokens(
            {"input_ids": inputs["input_ids"], "attention_mask": mask}
        )

    def balance(self, seed: int) -> str:
        """Train from BalancedBatches (packed rows, several processes); a line saying so."""
        import pyarrow.compute as pc

        args = self.args
        data: Any = self.train_dataset  # an Arrow dataset: the tokenize stage's
        lengths = pc.list_value_length(data.with_format("arrow")["input_ids"]).to_pylist()
        self.balanced = BalancedBatches(
            lengths,
            args.per_device_train_batch_size,
            args.world_size,
            seed,
            lambda: self.state.epoch or 0.0,
        )
        return (
            f"train: packed rows balanced across {args.world_size} processes "
            f"({args.per_device_train_batch_size} examples each, nearly equal tokens per step)"
        )

    def get_train_dataloader(self) -> Any:
        if self.balanced is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        data: Any = self.train_dataset
        loader = DataLoader(
            data,
            batch_sampler=self.balanced,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)


def one_gpu_per_process(args: Any) -> Any:
    """A single process on a machine with several GPUs: the Trainer would wrap the model in
    nn.DataParallel and multiply the batch by the GPU count (per_device_train_batch_size x 4 on
    4 GPUs) while the quantized model sits on GPU 0 alone. One process trains on one GPU; several
    GPUs are `--gpus N` (one process each). `_n_gpu` is the field `n_gpu` reads."""
    if getattr(args, "n_gpu", 0) > 1 and getattr(args, "world_size", 1) == 1:
        if not hasattr(args, "_n_gpu"):
            stop(N_GPU)
        args._n_gpu = 1
    return args


def keep_training_layout(model: Any) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its fast CPU inference kernel the
    first time the layer runs in eval mode without grad, and the repacked layer then fails in
    training (`result += bias` on a view): evaluating during training must not trigger that."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                stop(CPU_REPACK)
            module.support_avx512bf16_for_cpu = False


def clean_fsdp_prefixes() -> bool:
    """FSDP-QLoRA (runner/models/fsdp_names.py says why): wrap peft's prefix function once so
    the prefixes lose FSDP's inner wrapper names. True when it is (now or already) wrapped."""
    from peft.tuners import tuners_utils

    from runner.models.fsdp_names import clean_prefixes

    found = getattr(tuners_utils, "_get_tuner_state_dict_key_prefixes", None)
    if found is None:
        stop(FSDP_PREFIXES)
    if getattr(found, "cleans_fsdp_names", False):
        return True
    tuners_utils._get_tuner_state_dict_key_prefixes = clean_prefixes(found)
    return True


def no_ddp_graph_splitting() -> None:
    """dynamo's DDP optimizer (optimize_ddp, on by default) splits every graph it compiles inside
    a DDP forward at gradient-bucket boundaries: meant for a whole-model compile, whose gradients
    otherwise all arrive at the end. Compiled layer by layer, the gradients already arrive layer
    by layer for DDP's own hooks, and the split graphs left the GPU idle between their pieces
    (figures: BENCHMARKS.md, "Measurements behind the code"). Off, the layers compile to the same
    graphs as in one process."""
    import torch._dynamo

    if not hasattr(torch._dynamo.config, "optimize_ddp"):
        stop(OPTIMIZE_DDP)
    torch._dynamo.config.optimize_ddp = False


def chunk_the_loss(model: Any, always: bool = False) -> str:
    """Install the chunked loss (runner/models/chunked_loss.py) on `model` (a peft or
    transformers causal LM): the output head's forward passes hidden states through (this
    instance only: weights and names unchanged) and the model's `loss_function` hook applies the
    head a chunk at a time, to micro-batches over its one-pass size (`always`: over one chunk).
    A line saying what was done or why not."""
    base = unwrapped(model)
    if problem := chunked_loss.head_problem(base):
        return f"chunked_cross_entropy: off: {problem}"
    if not isinstance(getattr(type(base), "loss_function", None), property):
        stop(LOSS_FUNCTION)
    head = base.get_output_embeddings()
    head.forward = lambda hidden: hidden
    one_pass = chunked_loss.CHUNK_ELEMENTS if always else chunked_loss.ONE_PASS_ELEMENTS
    base.loss_function = chunked_loss.chunked_causal_lm_loss(head, one_pass)
    vocab = base.config.vocab_size
    return (
        f"chunked_cross_entropy: logits and loss {chunked_loss.chunk_tokens(vocab)} tokens at a "
        f"time for micro-batches over {one_pass // vocab:,} tokens (vocabulary {vocab:,})"
    )

"""train.chunked_cross_entropy: the causal-LM loss without the full logits tensor.

transformers' causal LMs compute `logits = lm_head(hidden)` for every token, upcast them to
fp32 and take the cross-entropy: at 65k vocabulary and 10k tokens per step that is 2.6 GB of
bf16 logits plus 5 GB of fp32 copies and gradients, the largest tensors of a QLoRA step. Here
the model's output head passes the hidden states through, and the loss function (the model's
own `loss_function` hook) computes logits and cross-entropy a chunk of tokens at a time, each
chunk recomputed in the backward pass (activation checkpointing), so only one chunk's logits
exist at once. Micro-batches of up to ONE_PASS_ELEMENTS logits (~8k tokens at 65k) take one
pass, as the model's own loss does, with no recompute. Same loss and gradients as the model's
own loss (tests/test_chunked_loss.py); the frozen head's weight gets no gradient, as before.
runner.training.trainer.chunk_the_loss installs it on a model (the head and the loss hook).
"""

from __future__ import annotations

from typing import Any

from runner.data.collate import IGNORE_INDEX
from runner.recipe import Recipe

CHUNK_ELEMENTS = 2**27  # logits per chunk: ~2k tokens at a 65k vocabulary (0.5 GB fp32)
ONE_PASS_ELEMENTS = 2**29  # up to this many logits (~8k tokens at 65k), one pass, no recompute


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def is_chunked(tokens: int, vocab_size: int, one_pass: int | None = None) -> bool:
    """Whether a micro-batch of `tokens` is computed in chunks (else in one pass, as the
    model's own loss does: a few GiB at most, and no recompute). `one_pass`: the most logits
    taken in one pass (default ONE_PASS_ELEMENTS; CHUNK_ELEMENTS: all over one chunk)."""
    return tokens * vocab_size > (ONE_PASS_ELEMENTS if one_pass is None else one_pass)


def chunking_wanted(recipe: Recipe, cuda: bool) -> bool:
    """The setting resolved: "auto" is on with CUDA, except under FSDP."""
    setting = recipe.get("train.chunked_cross_entropy")
    if setting == "auto":
        return cuda and recipe.get("launch.strategy") != "fsdp"
    return bool(setting)


def head_problem(base: Any) -> str | None:
    """Why the (unwrapped) model's output head cannot be chunked (None: it can)."""
    import torch

    head = base.get_output_embeddings()
    config = base.config
    if type(head) is not torch.nn.Linear:
        return (
            f"the output head is a {type(head).__name__} (adapted or wrapped), not a plain Linear"
        )
    if head.weight.requires_grad:
        return "the output head is trained (modules_to_save)"
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({key})"
    return None


def chunked_causal_lm_loss(head: Any, one_pass: int | None = None) -> Any:
    """A `loss_function` for transformers' causal LMs that receives the hidden states as
    "logits" (the head passes them through) and applies `head` chunk by chunk to micro-batches
    of over `one_pass` logits."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_sum(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, head.weight, head.bias).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

    def loss_function(
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        hidden = logits  # the head passed the hidden states through
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        if ignore_index != IGNORE_INDEX:
            targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if not is_chunked(flat.shape[0], vocab_size, one_pass):
            total = chunk_sum(flat, targets)
        else:
            size = chunk_tokens(vocab_size)
            total = flat.new_zeros((), dtype=torch.float32)
            for h, t in zip(flat.split(size), targets.split(size), strict=True):
                if torch.is_grad_enabled() and h.requires_grad:
                    total = total + checkpoint(chunk_sum, h, t, use_reentrant=False)
                else:
                    total = total + chunk_sum(h, t)
        if num_items_in_batch is None:
            return total / (targets != IGNORE_INDEX).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    return loss_function

"""How tokenized rows become a training batch (`train.packing`).

- packing = false (default): dynamic padding to the longest row of the batch
  (`DataCollatorForSeq2Seq`), always on the right whatever the tokenizer's padding side (a left-
  padding tokenizer such as ChatGLM3's would shift every position), labels padded with -100 so
  padding is never in the loss. Labels are padded on their own, never derived from input_ids, so
  an eos that is also the pad token stays trained.
- packing = true: the rows of a batch are concatenated into one sequence with no padding at all
  (`DataCollatorWithFlattening`); position_ids restart at 0 for every row, from which
  transformers (>= 5, sdpa / eager / flex attention) builds a block-diagonal causal mask, so
  rows never attend to each other; the first label of every row is -100 so no row learns to
  predict its first token from the previous row. The batch carries use_cache=False: transformers
  builds the block-diagonal mask only without a KV cache, and a model whose config says
  use_cache=True would otherwise let the rows see each other.
"""

from __future__ import annotations

import copy
from typing import Any

from runner.recipe import Recipe

IGNORE = -100


def make_collator(recipe: Recipe, tokenizer: Any) -> Any:
    """The data collator for `recipe`'s [train] settings."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if recipe.get("train.packing"):
        return WithoutCache(
            DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
        )
    if tokenizer.padding_side != "right":
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its padding side
        tokenizer.padding_side = "right"
    if recipe.get("train.padding") == "max_length":
        return DataCollatorForSeq2Seq(
            tokenizer,
            padding="max_length",
            label_pad_token_id=IGNORE,
            max_length=recipe.get("tokenize.max_length"),
        )
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=IGNORE,
        pad_to_multiple_of=8 if torch.cuda.is_available() else None,
    )


class WithoutCache:
    """A collator whose batches ask the model for no KV cache (see the module docstring)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        batch["use_cache"] = False
        return batch

"""How tokenized rows become a training batch (`train.packing`, `train.pad_to_multiple_of`).

- packing = false (default): dynamic padding to the longest row of the batch
  (`DataCollatorForSeq2Seq`), always on the right whatever the tokenizer's padding side (a left-
  padding tokenizer such as ChatGLM3's would shift every position), labels padded with -100 so
  padding is never in the loss. Labels are padded on their own, never derived from input_ids, so
  an eos that is also the pad token stays trained. The padded length is rounded up to
  `pad_to_multiple_of` ("auto": 8 on CUDA, tensor-core friendly; no rounding on the CPU);
  `padding = "max_length"` pads every row to tokenize.max_length instead.
- packing = true: the rows of a batch are concatenated into one sequence
  (`DataCollatorWithFlattening`); position_ids restart at 0 for every row, from which
  transformers (>= 5, sdpa / eager / flex attention) builds a block-diagonal causal mask, so
  rows never attend to each other; the first label of every row is -100 so no row learns to
  predict its first token from the previous row. The batch carries use_cache=False: transformers
  builds the block-diagonal mask only without a KV cache, and a model whose config says
  use_cache=True would otherwise let the rows see each other.
- packing with `pad_to_multiple_of` > 1: the flattened row is padded at its end to a multiple of
  that many tokens, so a run sees a few sequence lengths instead of one per batch (compiled
  kernels such as flex_attention's are built once per length). The padding is a segment of its
  own (position_ids 0..k-1, input_ids the pad id, labels -100): under the block-diagonal mask no
  real token attends to it and it is never in the loss, so the loss is the unpadded one. No
  attention_mask is added (transformers would then drop the block-diagonal mask), so
  `real_token_mask` tells the pad segment apart for the token counts (`count_real_tokens`).
  "auto" is PACKED_FLEX_MULTIPLE with attn_implementation = "flex_attention", else 1 (sdpa and
  eager run any length without recompiling: padding would only cost time).

PACKED_FLEX_MULTIPLE = 512: the shipped demo data (about 158 tokens per row, sd 24) packs 32
rows into 4,500-5,700 tokens; multiples of 512 give 2 lengths in a run (occasionally 3) and
waste 4% of the tokens, 1024 also 2 lengths but 7%, 2048 one length but 18% (6144 for every
batch). At 64 rows every multiple from 512 to 2048 gives 2 lengths (2-7% waste). 512 is also a
multiple of flex_attention's 128-token blocks.
"""

from __future__ import annotations

import copy
from typing import Any

from runner.recipe import Recipe

IGNORE_INDEX = -100  # labels the loss skips: the prompt, padding (torch's and HF's default)
PACKED_FLEX_MULTIPLE = 512


def pad_multiple(recipe: Recipe, cuda: bool | None = None) -> int:
    """`train.pad_to_multiple_of` with "auto" resolved (see the module docstring); 1: none."""
    value = recipe.get("train.pad_to_multiple_of")
    if value != "auto":
        return int(value)
    if recipe.get("train.packing"):
        flex = recipe.get("model.attn_implementation") == "flex_attention"
        return PACKED_FLEX_MULTIPLE if flex else 1
    if recipe.get("train.padding") == "max_length":
        return 1
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return 8 if cuda else 1


def pad_id_of(tokenizer: Any) -> int:
    """The id the pad segment of a packed row is made of (its value never reaches the loss)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def make_collator(recipe: Recipe, tokenizer: Any) -> Any:
    """The data collator for `recipe`'s [train] settings."""
    from transformers import DataCollatorForSeq2Seq

    multiple = pad_multiple(recipe)
    if recipe.get("train.packing"):
        return Packed(pad_id_of(tokenizer), multiple)
    if tokenizer.padding_side != "right":
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its padding side
        tokenizer.padding_side = "right"
    if recipe.get("train.padding") == "max_length":
        return DataCollatorForSeq2Seq(
            tokenizer,
            padding="max_length",
            label_pad_token_id=IGNORE_INDEX,
            max_length=recipe.get("tokenize.max_length"),
            pad_to_multiple_of=multiple if multiple > 1 else None,
        )
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=IGNORE_INDEX,
        pad_to_multiple_of=multiple if multiple > 1 else None,
    )


class Packed:
    """Rows flattened into one sequence, padded at the end by a segment of its own to a multiple
    of `multiple` tokens, with no KV cache asked for (see the module docstring)."""

    def __init__(self, pad_id: int, multiple: int = 1) -> None:
        from transformers import DataCollatorWithFlattening

        self.pad_id = pad_id
        self.multiple = multiple
        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        import torch

        batch = self.inner(features)
        length = batch["input_ids"].shape[1]
        pad = -length % self.multiple
        if pad:
            fill = {
                "input_ids": torch.full((1, pad), self.pad_id, dtype=batch["input_ids"].dtype),
                "labels": torch.full((1, pad), IGNORE_INDEX, dtype=batch["labels"].dtype),
                "position_ids": torch.arange(pad, dtype=batch["position_ids"].dtype)[None],
            }
            for key, tail in fill.items():
                batch[key] = torch.cat([batch[key], tail], dim=1)
        batch["use_cache"] = False
        return batch


def real_token_mask(batch: dict[str, Any], pad_id: int, multiple: int) -> Any:
    """1 for the tokens of real rows, 0 for padding: the attention mask where there is one; for
    a packed row, everything but its pad segment: the last segment (from the last position 0)
    when it is shorter than `multiple`, made of `pad_id` only and trains nothing."""
    import torch

    if "attention_mask" in batch:
        return batch["attention_mask"]
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    if multiple <= 1 or "position_ids" not in batch or ids.shape[0] != 1:
        return mask
    starts = (batch["position_ids"][0] == 0).nonzero()
    if len(starts) < 2:  # a single segment is a real row, or the batch is all padding
        return mask
    start = int(starts[-1])
    tail, labels = ids[0, start:], batch["labels"][0, start:]
    if (
        len(tail) < multiple
        and bool((tail == pad_id).all())
        and bool((labels == IGNORE_INDEX).all())
    ):
        mask[0, start:] = 0
    return mask

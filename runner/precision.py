"""The one place a recipe's precision settings meet the hardware: the compute dtype of
de-quantized matmuls, the trainer's mixed precision (bf16 / fp16 flags) and peft's fp32 upcast.
`recipe plan --model` (models/estimate.py), the loader (models/load.py) and the trainer's
arguments (stages/train.py) all ask `resolve`, so a plan and a run cannot pick different dtypes.

Imports no torch: the hardware facts are passed in, or probed by `probe()` when a stage that
already needs torch asks for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.recipe import Recipe


@dataclass(frozen=True)
class Hardware:
    cuda: bool  # a CUDA GPU is visible
    bf16: bool  # and it computes in bf16 (Ampere or newer); never true without cuda


@dataclass(frozen=True)
class Precision:
    device: str  # "cuda" or "cpu"
    compute: str  # bnb_4bit_compute_dtype resolved: "float32", "bfloat16" or "float16"
    autocast: str | None  # the trainer's mixed precision: "bf16", "fp16" or None
    upcast: bool  # peft's fp32 upcast of the layers that stay unquantized

    @property
    def bf16(self) -> bool:
        return self.autocast == "bf16"

    @property
    def fp16(self) -> bool:
        return self.autocast == "fp16"


def probe() -> Hardware:
    import torch

    cuda = bool(torch.cuda.is_available())
    return Hardware(cuda, bool(cuda and torch.cuda.is_bf16_supported()))


def resolve(
    compute_dtype: str,
    bf16: bool | str,
    fp16: bool,
    upcast_to_fp32: bool | str,
    hw: Hardware,
) -> Precision:
    """Each "auto" decided against `hw`; explicit values kept as written (the recipe loader
    refuses contradictory pairs, models/load.precision_problems what the hardware cannot run)."""
    compute = compute_dtype
    if compute == "auto":
        compute = ("bfloat16" if hw.bf16 else "float16") if hw.cuda else "float32"
    upcast = compute != "bfloat16" if upcast_to_fp32 == "auto" else bool(upcast_to_fp32)
    if bf16 == "auto":
        # an explicit fp16 = true wins: TrainingArguments refuses both flags at once
        bf16 = hw.cuda and hw.bf16 and not fp16
    autocast = "bf16" if bf16 else "fp16" if fp16 else None
    return Precision("cuda" if hw.cuda else "cpu", compute, autocast, upcast)


def for_recipe(recipe: Recipe, hw: Hardware | None = None) -> Precision:
    """`resolve` with the recipe's values; the hardware is probed (torch) when not given."""
    q, train = recipe.section("quantization"), recipe.section("train")
    return resolve(
        q["bnb_4bit_compute_dtype"],
        train["bf16"],
        bool(train["fp16"]),
        q.get("upcast_to_fp32", True),
        hw if hw is not None else probe(),
    )

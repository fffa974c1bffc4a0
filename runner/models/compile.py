"""train.torch_compile: regional compilation of a model's repeated decoder layers.

Each layer is compiled in place (`nn.Module.compile`), so parameter names, checkpoints and the
saved adapter do not change, and gradient checkpointing still wraps every layer from outside.
The layers share one compiled graph (torch inlines the module's parameters as inputs), so the
compiler runs once per row length, not once per layer.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from runner.models.load import unwrapped
from runner.recipe import Recipe


def compile_wanted(recipe: Recipe, cuda: bool) -> bool:
    """The setting resolved. "auto" is on where it was measured and checked against eager
    numerics on a GPU: CUDA with flex_attention, one process or DDP. Not under FSDP (its flat
    parameters are not compiled per layer here); not with sdpa or eager attention, where
    compiled layers meet transformers' padding and packing masks (an earlier by-hand compile
    of sdpa with a packed mask gave NaN gradients; `true` turns it on there)."""
    setting = recipe.get("train.torch_compile")
    if setting == "auto":
        return (
            cuda
            and recipe.get("launch.strategy") != "fsdp"
            and recipe.get("model.attn_implementation") == "flex_attention"
        )
    return bool(setting)


def compile_problem(recipe: Recipe, cuda: bool) -> str | None:
    """Why compiling cannot work here (None: it can): on the CPU inductor builds C++ kernels."""
    compiler = os.environ.get("CXX", "g++")
    if cuda or shutil.which(compiler) or shutil.which("c++"):
        return None
    return (
        f"{recipe.origin('train.torch_compile')}: $.train.torch_compile: true needs a C++ "
        f"compiler on the CPU (torch.compile builds its kernels with {compiler}, not found); "
        'install one (e.g. g++) or set torch_compile = "auto" (off on the CPU)'
    )


def repeated_layers(model: Any) -> list[Any]:
    """The decoder layers: modules of the classes transformers never splits across devices
    (`_no_split_modules`), which for causal LMs are exactly the repeated blocks."""
    base = unwrapped(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_layers(model: Any) -> str:
    """Compile every repeated layer in place; a line saying what was compiled. Under DDP,
    call runner.training.trainer.no_ddp_graph_splitting first (it says why)."""
    layers = repeated_layers(model)
    if not layers:
        return "torch_compile: no repeated decoder layers found; the model runs eagerly"
    for layer in layers:
        layer.compile()
    return (
        f"torch_compile: {len(layers)} {type(layers[0]).__name__} layers compiled "
        "(the first steps, and the first step of each new row length, wait for the compiler)"
    )

"""The "auto" memory settings: which decoder layers are checkpointed, and whether the loss is
chunked, chosen to be as fast as the GPU's memory allows.

Both settings trade memory for recomputed matmul work and leave the math alone. Every candidate
layout (the first N of L decoder layers checkpointed, N = 0..L; the loss chunked or not) is
priced with `recipe plan --model`'s estimate (runner/models/estimate.py) at the longest row the
tokenize stage measured, and costed by the frozen weights its backward pass multiplies again:
N layers' linears, plus the output head when the loss is chunked. The cheapest layout whose
estimated peak stays MARGIN under the budget wins: train.memory_budget_gib, or what the GPU has
free when training starts plus what the run already holds. When none fits, every layer is
checkpointed and the loss chunked, and the line says the step may not fit.

Checkpointing the first layers and keeping the last ones is the layout with the lower peak: the
kept layers run backward first and free their activations before any checkpointed layer
recomputes its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runner.models.chunked_loss import chunking_wanted
from runner.recipe import Recipe

if TYPE_CHECKING:
    from runner.models.estimate import ModelPlan

GiB = float(2**30)
MARGIN = 0.10  # the estimate's error on the GPU path it prices: BENCHMARKS.md, "auto"


@dataclass(frozen=True)
class Layout:
    checkpointed: int  # the first N decoder layers
    layers: int
    chunking: str  # the loss: "off", "threshold" (chunked over its one-pass size), "always"
    peak: int  # estimated peak bytes on the GPU heap (torch.cuda.max_memory_allocated)
    recompute: int  # frozen weights multiplied again in backward

    def describe(self) -> str:
        if self.checkpointed == self.layers:
            ckpt = f"all {self.layers} layers checkpointed"
        elif self.checkpointed == 0:
            ckpt = f"no layer checkpointed ({self.layers} keep their activations)"
        else:
            ckpt = (
                f"{self.checkpointed} of {self.layers} layers checkpointed, the last "
                f"{self.layers - self.checkpointed} keep their activations"
            )
        loss = {
            "off": "loss in one pass",
            "threshold": "loss chunked over its one-pass size",
            "always": "loss chunked",
        }[self.chunking]
        return f"{ckpt}, {loss}"

    @property
    def chunked(self) -> bool:
        return self.chunking != "off"


@dataclass(frozen=True)
class Choice:
    layout: Layout
    budget: int | None  # bytes; None: not known here (planned on a machine without the GPU)
    budget_source: str
    fits: bool
    auto: tuple[str, ...]  # the settings that were "auto"

    def describe(self) -> str:
        """One line for the run and `recipe plan`."""
        settings = " and ".join(f'{key} = "auto"' for key in self.auto)
        est = f"estimated peak {self.layout.peak / GiB:.1f} GiB"
        if self.budget is None:
            return (
                f"{settings}: decided on the GPU when training starts (the leanest layout: "
                f"{self.layout.describe()}, {est})"
            )
        room = (
            f"{(1 - MARGIN) * self.budget / GiB:.1f} GiB ({self.budget_source}, less {MARGIN:.0%})"
        )
        if not self.fits:
            return (
                f"{settings}: nothing fits {room}: {self.layout.describe()}, {est}; the step "
                "may run out of memory (lower per_device_train_batch_size or tokenize.max_length)"
            )
        return f"{settings}: {self.layout.describe()}: {est} of {room}"


def _decided_by_memory(recipe: Recipe, key: str, cuda: bool) -> bool:
    """train.<key> = "auto" left to the memory budget: on CUDA, not under FSDP (the estimate
    does not model sharded weights); elsewhere "auto" has its fixed meaning."""
    return recipe.get(f"train.{key}") == "auto" and cuda and recipe.get("launch.strategy") != "fsdp"


def checkpointing_auto(recipe: Recipe, cuda: bool) -> bool:
    """gradient_checkpointing = "auto" decided by memory (elsewhere: every layer)."""
    return _decided_by_memory(recipe, "gradient_checkpointing", cuda)


def chunking_auto(recipe: Recipe, cuda: bool) -> bool:
    """chunked_cross_entropy = "auto" decided by memory (elsewhere: off)."""
    return _decided_by_memory(recipe, "chunked_cross_entropy", cuda)


def fixed_checkpointed(recipe: Recipe, layers: int) -> int:
    """The layers a setting that is not decided by memory checkpoints: true and "auto" (CPU,
    FSDP) all, false none, an integer that many (at most all)."""
    setting = recipe.get("train.gradient_checkpointing")
    if setting is True or setting == "auto":
        return layers
    if setting is False:
        return 0
    return min(int(setting), layers)


def candidates(plan: ModelPlan, recipe: Recipe, cuda: bool) -> list[Layout]:
    """Every layout the recipe's settings leave open, cheapest first."""
    acts = plan.memory.model
    layers = plan.layers
    if checkpointing_auto(recipe, cuda):
        ns: list[int] = list(range(layers + 1))
    else:
        ns = [fixed_checkpointed(recipe, layers)]
    # chunked_cross_entropy = true keeps its one-pass size; "auto" chunks every micro-batch
    if not plan.chunkable:  # the loss cannot be chunked for this model (the run says why)
        chunkings = ["off"]
    elif chunking_auto(recipe, cuda):
        chunkings = ["off", "always"]
    elif chunking_wanted(recipe, cuda):
        chunkings = ["threshold"]
    else:
        chunkings = ["off"]
    tokens = plan.tokens
    out = []
    for chunking in chunkings:
        for n in ns:
            peak = plan.memory.step(
                tokens.batch * tokens.peak_length, tokens.peak_length, n, chunking, device_heap=True
            )
            recompute = acts.recompute_params(n, chunking != "off")
            out.append(Layout(n, layers, chunking, peak, recompute))
    return sorted(out, key=lambda lay: (lay.recompute, lay.peak))


def choose(plan: ModelPlan, recipe: Recipe, cuda: bool, budget: int | None, source: str) -> Choice:
    """The cheapest layout that fits `budget` less the margin (None: not known here)."""
    auto = tuple(
        key
        for key, on in (
            ("gradient_checkpointing", checkpointing_auto(recipe, cuda)),
            ("chunked_cross_entropy", chunking_auto(recipe, cuda)),
        )
        if on
    )
    layouts = candidates(plan, recipe, cuda)
    if budget is None:  # the safest layout, and the estimate that goes with it
        safest = min(layouts, key=lambda lay: lay.peak)
        return Choice(safest, None, source, True, auto)
    for layout in layouts:
        if layout.peak <= (1 - MARGIN) * budget:
            return Choice(layout, budget, source, True, auto)
    return Choice(min(layouts, key=lambda lay: lay.peak), budget, source, False, auto)


def recipe_budget(recipe: Recipe) -> tuple[int | None, str]:
    gib = recipe.get("train.memory_budget_gib")
    if gib is None:
        return None, ""
    return int(gib * GiB), f"train.memory_budget_gib = {gib:g}"


def gpu_budget(recipe: Recipe) -> tuple[int, str]:
    """The budget on this process's GPU: the recipe's, else the free memory plus what torch
    already holds (the loaded model, cached blocks)."""
    import torch

    budget, source = recipe_budget(recipe)
    if budget is not None:
        return budget, source
    free, _ = torch.cuda.mem_get_info()
    held = torch.cuda.memory_reserved()
    return free + held, (
        f"{(free + held) / GiB:.1f} GiB: {free / GiB:.1f} free on the GPU + "
        f"{held / GiB:.1f} the run holds"
    )


def apply(model: Any, layout: Layout) -> str | None:
    """Checkpoint the first `layout.checkpointed` decoder layers only; a problem line when the
    model's layers cannot be chosen one by one (then all stay checkpointed)."""
    from runner.models.compile import repeated_layers

    if layout.checkpointed == layout.layers:
        return None
    layers = repeated_layers(model)
    if len(layers) != layout.layers or not all(
        hasattr(layer, "gradient_checkpointing") for layer in layers
    ):
        return (
            "gradient_checkpointing: this model's layers cannot be checkpointed one by one "
            "(no per-layer switch); every layer stays checkpointed"
        )
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < layout.checkpointed
    return None

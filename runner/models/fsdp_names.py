"""FSDP-QLoRA: make peft see the adapter's state-dict keys under FSDP's nested wrappers.

peft picks the adapter's entries out of a state dict by module-name prefixes it derives from
`model.named_modules()`, and strips only a *leading* `_fsdp_wrapped_module.` from those names.
FSDP with peft's auto-wrap policy nests wrappers (every decoder layer and every LoRA leaf is a unit
of its own), so the names keep inner `_fsdp_wrapped_module.` segments while FSDP's state dicts use
clean names. Nothing matches: the final adapter file holds no tensors, and the Trainer's
adapter-only sharded checkpoints go through the same filter. The versions this was found with
are in docs/compatibility.md, the figures in BENCHMARKS.md ("Measurements behind the code").

`clean_prefixes()` wraps peft's prefix function so the prefixes lose every such segment; the
matching, the adapter-name handling and the file format stay peft's. runner.training.trainer
installs it when FSDP is on, and stops the run where peft has no such function.

Loading a sharded checkpoint back has a problem of its own: accelerate reads the adapter's shards
and hands them to peft's `set_peft_model_state_dict`, which keeps the `base_model.model.` prefix
only if some `named_parameters()` name starts with it. Outside `summon_full_params` FSDP's names
start with `_fsdp_wrapped_module.`, so peft strips the prefix and `load_state_dict(strict=False)`
matches nothing: the resumed run trained on from the initial LoRA weights.
`load_sharded_adapter()` loads them again after the Trainer's resume, placing each saved key
by the model's own state-dict keys (`adapter_key_map()`), and fails when any key has no place.

The optimizer state misses too: accelerate reads it into a template made from the optimizer's
current state, and before the first step Adam has none, so nothing is read and the resumed run
restarts Adam's moments (the loss of the first step after the resume matches the uninterrupted
run's, the next one does not). `load_sharded_optimizer()` creates
the state first (`create_optimizer_state()`) so that the template holds every moment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

WRAPPED = "_fsdp_wrapped_module."


def clean_prefixes(found: Callable[..., set[str]]) -> Callable[..., set[str]]:
    """peft's prefix function `found`, its prefixes without FSDP's wrapper segments (installed
    by runner.training.trainer.clean_fsdp_prefixes)."""

    def prefixes(model: Any, adapter_name: str | None = None) -> set[str]:
        return {p.replace(WRAPPED, "") for p in found(model, adapter_name)}

    prefixes.cleans_fsdp_names = True  # type: ignore[attr-defined]
    return prefixes


def saved_name(key: str, adapter_name: str) -> str:
    """The name peft saves a model key under: the adapter's path segment dropped
    (`q.lora_A.default.weight` -> `q.lora_A.weight`) and FSDP's wrapper segments too."""
    return ".".join(part for part in key.replace(WRAPPED, "").split(".") if part != adapter_name)


def adapter_key_map(
    saved: Iterable[str], model_keys: Iterable[str], adapter_name: str
) -> tuple[dict[str, str], list[str]]:
    """Each saved adapter key's key in the model's state dict, and the saved keys that have none.
    Only model keys holding the adapter's own segment are candidates, so a saved key can never
    land on a base weight of the same path."""
    by_saved = {
        saved_name(k, adapter_name): k.replace(WRAPPED, "")
        for k in model_keys
        if adapter_name in k.replace(WRAPPED, "").split(".")
    }
    found = {k: by_saved[k] for k in saved if k in by_saved}
    return found, sorted(k for k in saved if k not in by_saved)


def load_sharded_adapter(model: Any, plugin: Any, folder: Path) -> int:
    """Load the LoRA weights of an FSDP-sharded checkpoint folder (`pytorch_model_fsdp_0`, written
    by accelerate as {"model": peft's adapter state dict}) into `model`, the FSDP-wrapped peft
    model, on every rank. Returns how many tensors were loaded; ValueError says why not."""
    import logging

    import torch.distributed.checkpoint as dist_cp
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    adapter = model.active_adapter
    with FSDP.state_dict_type(
        model,
        StateDictType.SHARDED_STATE_DICT,
        plugin.state_dict_config,
        plugin.optim_state_dict_config,
    ):
        whole = model.state_dict()
        # The template has the saved names and sharded tensors of the right shapes; dist_cp
        # fills it in place from every rank's shard files.
        saved = get_peft_model_state_dict(model, state_dict=whole, adapter_name=adapter)
        if not saved:
            raise ValueError("the model has no adapter weights under FSDP to load into")
        dist_cp.load(
            {"model": saved},
            storage_reader=dist_cp.FileSystemReader(str(folder)),
            planner=DefaultLoadPlanner(),
        )
        placed, unplaced = adapter_key_map(saved, whole, adapter)
        if unplaced:
            raise ValueError(
                f"{len(unplaced)} of {len(saved)} saved adapter tensors have no place in the "
                f"model (first: {unplaced[0]})"
            )
        # FSDP warns once for every weight the state dict lacks: all the frozen base weights.
        fsdp_log = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
        level = fsdp_log.level
        fsdp_log.setLevel(logging.ERROR)
        try:
            result = model.load_state_dict({placed[k]: v for k, v in saved.items()}, strict=False)
        finally:
            fsdp_log.setLevel(level)
    unexpected = [k.replace(WRAPPED, "") for k in result.unexpected_keys]
    if unexpected:
        raise ValueError(f"the model did not take {len(unexpected)} tensors: {unexpected[0]}")
    return len(saved)


def create_optimizer_state(optimizer: Any) -> None:
    """Adam's moments exist only after a first step: one with zero gradients at learning rate 0
    creates them and leaves every weight as it is (decoupled weight decay scales by 1 - lr * wd)."""
    import torch

    groups = optimizer.param_groups
    for group in groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for group, rate in zip(groups, rates, strict=True):
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)


def load_sharded_optimizer(model: Any, optimizer: Any, plugin: Any, folder: Path) -> int:
    """Load the optimizer state of an FSDP-sharded checkpoint folder (`optimizer_0`, written by
    accelerate as {"optimizer": FSDP.optim_state_dict(...)}) into `optimizer` on every rank.
    Returns for how many parameters; dist_cp fails when the folder lacks any of them."""
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    inner = getattr(optimizer, "optimizer", optimizer)  # past accelerate's wrapper and its hooks
    if not inner.state:
        create_optimizer_state(inner)
    with FSDP.state_dict_type(
        model,
        StateDictType.SHARDED_STATE_DICT,
        plugin.state_dict_config,
        plugin.optim_state_dict_config,
    ):
        template = {"optimizer": FSDP.optim_state_dict(model, inner)}
        dist_cp.load(
            template,
            storage_reader=dist_cp.FileSystemReader(str(folder)),
            planner=DefaultLoadPlanner(),
        )
        inner.load_state_dict(
            FSDP.optim_state_dict_to_load(
                model=model, optim=inner, optim_state_dict=template["optimizer"]
            )
        )
    return len(template["optimizer"]["state"])

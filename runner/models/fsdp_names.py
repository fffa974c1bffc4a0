"""FSDP-QLoRA: make peft see the adapter's state-dict keys under FSDP's nested wrappers.

peft 0.21 picks the adapter's entries out of a state dict by module-name prefixes it derives from
`model.named_modules()`, and strips only a *leading* `_fsdp_wrapped_module.` from those names.
FSDP with peft's auto-wrap policy nests wrappers (every decoder layer and every LoRA leaf is a unit
of its own), so the names keep inner `_fsdp_wrapped_module.` segments while FSDP's state dicts use
clean names. Nothing matches: the final adapter file holds no tensors (measured on an H200: 336
LoRA tensors in the gathered state dict, 0 in the saved adapter, 40 bytes; 24 of 24 with this
fix), and the Trainer's adapter-only sharded checkpoints go through the same filter. Loading those
checkpoints back has a second problem of its own, so runner/checkpoints.py does not resume them.

`clean_fsdp_prefixes()` wraps peft's prefix function so the prefixes lose every such segment; the
matching, the adapter-name handling and the file format stay peft's. It is applied only when FSDP
is on, and only where peft has that function (older and newer versions match keys otherwise).
"""

from __future__ import annotations

from typing import Any

WRAPPED = "_fsdp_wrapped_module."


def clean_fsdp_prefixes() -> bool:
    """Patch peft's prefix function once; True when it is (now or already) patched."""
    try:
        from peft.tuners import tuners_utils
    except ImportError:
        return False
    found = getattr(tuners_utils, "_get_tuner_state_dict_key_prefixes", None)
    if found is None:
        return False
    if getattr(found, "cleans_fsdp_names", False):
        return True

    def prefixes(model: Any, adapter_name: str | None = None) -> set[str]:
        return {p.replace(WRAPPED, "") for p in found(model, adapter_name)}

    prefixes.cleans_fsdp_names = True  # type: ignore[attr-defined]
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes
    return True

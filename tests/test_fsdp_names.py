"""FSDP-QLoRA adapter keys: peft's prefixes under FSDP's nested wrappers (models/fsdp_names.py).

FSDP cannot run on the CPU, so the wrappers are imitated: a module that holds the real one as
`_fsdp_wrapped_module`, nested as peft's auto-wrap policy nests them, while the state dict has the
clean names FSDP's own state dicts have."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from runner.models import fsdp_names  # noqa: E402


class Wrapped(torch.nn.Module):
    def __init__(self, inner: Any) -> None:
        super().__init__()
        self._fsdp_wrapped_module = inner

    def forward(self, x: Any) -> Any:
        return self._fsdp_wrapped_module(x)


def model() -> Any:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))


def wrap_like_fsdp(m: Any) -> Any:
    """Root, every adapted layer and every LoRA leaf in a wrapper of its own."""
    inner = m.base_model.model
    for i in (0, 2):
        layer = inner[i]
        for part in ("lora_A", "lora_B"):
            getattr(layer, part)["default"] = Wrapped(getattr(layer, part)["default"])
        inner[i] = Wrapped(layer)
    return Wrapped(m)


def test_adapter_keys_are_found_under_nested_wrappers(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners import tuners_utils

    m = model()
    expected = peft.get_peft_model_state_dict(m)
    clean = dict(m.state_dict())  # FSDP's state dicts carry the unwrapped names
    wrapped = wrap_like_fsdp(m)._fsdp_wrapped_module
    assert any(".0._fsdp_wrapped_module.lora_A" in n for n, _ in wrapped.named_modules())
    monkeypatch.setattr(
        tuners_utils,
        "_get_tuner_state_dict_key_prefixes",
        tuners_utils._get_tuner_state_dict_key_prefixes,  # restored after the test
    )
    assert fsdp_names.clean_fsdp_prefixes()
    assert fsdp_names.clean_fsdp_prefixes()  # once only: a second call does not wrap again
    found = peft.get_peft_model_state_dict(wrapped, state_dict=clean)
    assert sorted(found) == sorted(expected) and len(found) == 4
    assert all(torch.equal(found[k], expected[k]) for k in expected)


def test_adapter_tensors_counts_what_the_saved_file_holds(tmp_path: Any) -> None:
    """save_final fails an FSDP run whose adapter file came out empty (it did: 40 bytes)."""
    from safetensors.torch import save_file

    from runner.stages.train import adapter_tensors

    assert adapter_tensors(tmp_path) == 0
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    assert adapter_tensors(tmp_path) == 0
    save_file(
        {"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "adapter_model.safetensors")
    )
    assert adapter_tensors(tmp_path) == 2

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
    from runner.training.trainer import clean_fsdp_prefixes

    assert clean_fsdp_prefixes()
    installed = tuners_utils._get_tuner_state_dict_key_prefixes
    assert clean_fsdp_prefixes()  # once only: a second call does not wrap again
    assert tuners_utils._get_tuner_state_dict_key_prefixes is installed
    found = peft.get_peft_model_state_dict(wrapped, state_dict=clean)
    assert sorted(found) == sorted(expected) and len(found) == 4
    assert all(torch.equal(found[k], expected[k]) for k in expected)


def test_adapter_tensors_counts_what_the_saved_file_holds(tmp_path: Any) -> None:
    """save_final fails an FSDP run whose adapter file came out empty (it did: 40 bytes)."""
    from safetensors.torch import save_file

    from runner.training.loop import adapter_tensors

    assert adapter_tensors(tmp_path) == 0
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    assert adapter_tensors(tmp_path) == 0
    save_file(
        {"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "adapter_model.safetensors")
    )
    assert adapter_tensors(tmp_path) == 2


def test_saved_adapter_keys_find_their_place_under_fsdp_names() -> None:
    """A sharded checkpoint holds peft's saved names (no adapter segment); the loader places them
    by the model's own keys, which under FSDP carry wrapper segments, and loads what peft's own
    set_peft_model_state_dict would."""
    m = model()
    saved = {k: v + 1 for k, v in peft.get_peft_model_state_dict(m).items()}
    wrapped = wrap_like_fsdp(model())
    names = list(wrapped.state_dict())
    assert any(".lora_A.default._fsdp_wrapped_module.weight" in n for n in names)
    placed, unplaced = fsdp_names.adapter_key_map(saved, names, "default")
    assert unplaced == [] and len(placed) == 4
    assert placed["base_model.model.0.lora_A.weight"] == "base_model.model.0.lora_A.default.weight"
    fresh, reference = model(), model()
    result = fresh.load_state_dict({placed[k]: v for k, v in saved.items()}, strict=False)
    assert result.unexpected_keys == []
    peft.set_peft_model_state_dict(reference, saved)
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    assert torch.equal(
        fresh.state_dict()["base_model.model.0.lora_B.default.weight"], torch.ones(8, 2)
    )


def test_saved_keys_without_a_place_are_reported() -> None:
    names = list(model().state_dict())
    saved = ["base_model.model.0.lora_A.weight", "base_model.model.5.lora_A.weight"]
    placed, unplaced = fsdp_names.adapter_key_map(saved, names, "default")
    assert placed == {
        "base_model.model.0.lora_A.weight": "base_model.model.0.lora_A.default.weight"
    }
    assert unplaced == ["base_model.model.5.lora_A.weight"]
    # another adapter's keys, and base weights of the same path, are no place for these
    assert fsdp_names.adapter_key_map(saved, names, "other") == ({}, sorted(saved))
    assert fsdp_names.adapter_key_map(
        ["base_model.model.0.base_layer.weight"], names, "default"
    ) == (
        {},
        ["base_model.model.0.base_layer.weight"],
    )


def test_saved_name_drops_the_adapter_and_wrapper_segments() -> None:
    assert (
        fsdp_names.saved_name(
            "_fsdp_wrapped_module.base_model.model.0._fsdp_wrapped_module.lora_A.default.weight",
            "default",
        )
        == "base_model.model.0.lora_A.weight"
    )
    # only a whole segment is the adapter: a module named default_proj stays
    assert fsdp_names.saved_name("m.default_proj.lora_A.default.weight", "default") == (
        "m.default_proj.lora_A.weight"
    )


def test_optimizer_state_is_created_without_moving_the_weights() -> None:
    """accelerate reads the sharded optimizer state into a template made from the current state:
    empty before the first step, so it is created first, and the weights must not move (AdamW
    with weight decay and a non-zero learning rate would move them)."""
    m = model()
    params = [p for p in m.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=0.5, weight_decay=0.1)
    assert not opt.state
    fsdp_names.create_optimizer_state(opt)
    assert len(opt.state) == len(params) == 4
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(float(opt.state[p]["exp_avg"].abs().sum()) == 0.0 for p in params)
    assert opt.param_groups[0]["lr"] == 0.5
    assert all(p.grad is None for p in params)

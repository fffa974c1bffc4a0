"""peft LoRA adapters between ChatGLM3 and native GLM module names, exactly (delta W unchanged):
an adapter trained on the native model can be used with the original ChatGLM3 code, and back."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runner.models.chatglm.config import ChatGLMDims
from runner.models.chatglm.files import AtomicDir, load_shard, read_config, unshare
from runner.models.chatglm.names import (
    CHATGLM_QKV,
    GLM_QKV,
    QKV_PARTS,
    dedupe,
    match_module,
    translate_names,
)
from runner.models.chatglm.weights import fuse_qkv_rows, split_qkv_rows

if TYPE_CHECKING:
    import torch

_PEFT_PREFIX = "base_model.model."
_LORA_A, _LORA_B, _LORA_B_BIAS = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"


@dataclass
class ConvertedAdapter:
    """Result of :func:`convert_adapter`.

    ``config`` is the input adapter config with ``target_modules``, ``modules_to_save``,
    ``rank_pattern`` and ``alpha_pattern`` rewritten for the other naming: write it as
    ``adapter_config.json`` next to ``state_dict`` (``adapter_model.safetensors``).
    """

    state_dict: dict[str, torch.Tensor]
    target_modules: list[str] | str
    config: dict[str, Any]


@dataclass
class _Lora:
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None
    scaling: float


def _config_dict(lora_config: Any) -> dict[str, Any]:
    if lora_config is None:
        raise ValueError("a LoRA config (dict or peft LoraConfig) is required")
    if hasattr(lora_config, "to_dict"):
        lora_config = lora_config.to_dict()
    cfg = dict(lora_config)
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(cfg.get(key), set | tuple):
            cfg[key] = sorted(cfg[key])
    return cfg


def _pattern_value(patterns: Mapping[str, Any] | None, module: str) -> Any | None:
    """peft's ``get_pattern_key`` semantics: the first key matching the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _scaling(cfg: Mapping[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern"), module)
    if alpha is None:
        alpha = cfg.get("lora_alpha", 8)
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _alpha_for(cfg: Mapping[str, Any], scaling: float, rank: int) -> float | int:
    alpha = scaling * (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    return round(alpha) if abs(alpha - round(alpha)) < 1e-9 else alpha


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.X`` -> (``base_model.model.``, ``X``)."""
    return (_PEFT_PREFIX, key[len(_PEFT_PREFIX) :]) if key.startswith(_PEFT_PREFIX) else ("", key)


def _check_supported(cfg: Mapping[str, Any]) -> None:
    if cfg.get("peft_type", "LORA") not in ("LORA", None):
        raise ValueError(f"only LoRA adapters are supported, got {cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        raise ValueError("DoRA adapters are not supported")
    if cfg.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out adapters are not supported")


def convert_adapter(
    adapter_sd: Mapping[str, torch.Tensor],
    lora_config: Any,
    *,
    to: Literal["glm", "chatglm"],
    model_config: Mapping[str, Any] | None = None,
    prune_zero_rank: bool = True,
) -> ConvertedAdapter:
    """Convert a peft LoRA adapter between ChatGLM and native GLM module names, exactly.

    ``adapter_sd`` uses peft's saved naming (``base_model.model.<module>.lora_A.weight``).
    Every module except attention maps one-to-one (same tensors). Attention:

    * ChatGLM -> GLM: the fused ``query_key_value`` LoRA ``(A, B)`` becomes three LoRAs that
      share ``A`` and take the q/k/v row blocks of ``B`` (and of ``lora_B.bias``); same rank
      and alpha, so every delta W is identical. With ``prune_zero_rank`` (default), rank
      components whose B column is exactly zero in a part are dropped (recovers the
      original q/k/v LoRAs of an adapter exported by the GLM -> ChatGLM block-diagonal path;
      an all-zero B, e.g. a fresh adapter, is kept whole).
    * GLM -> ChatGLM: if the present q/k/v LoRAs have identical ``A`` and scaling, the fused
      LoRA keeps that ``A`` and stacks the B blocks (missing parts get zero rows): same rank.
      Otherwise ``A`` is stacked along the rank dimension (rank ``r_q + r_k + r_v``) and ``B``
      is block-diagonal; its alpha is raised in ``alpha_pattern`` so the scaling (alpha/r, or
      alpha/sqrt(r) with rslora) equals the q part's, and other parts' B blocks are rescaled
      by their scaling ratio (1 in the usual case, so the tensors are copied bit for bit).
      delta W = scaling * B @ A is preserved for q, k and v.

    ``model_config`` is the ChatGLM ``config.json`` dict. It is required to split a fused
    LoRA (ChatGLM -> GLM); for fusing, ChatGLM2/3's multi-query ``[q; k; v]`` row layout is
    inferred from the B shapes when it is missing (pass it for non-multi-query models, whose
    rows are interleaved per head).
    """
    cfg = _config_dict(lora_config)
    _check_supported(cfg)
    dims = ChatGLMDims.from_config(model_config) if model_config is not None else None
    out_sd: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float | int]] = {}  # out module -> (rank, alpha)
    # layer -> (key prefix, part -> suffix -> tensor); part is "qkv" on the ChatGLM side
    pending: dict[int, tuple[str, dict[str, dict[str, torch.Tensor]]]] = {}

    for key, tensor in adapter_sd.items():
        prefix, rel = _split_key(key)
        m = match_module(rel, to)
        if m is None:
            raise ValueError(f"cannot map adapter key {key!r} to {to} naming")
        if m.kind == "plain":
            out_sd[prefix + m.path + m.suffix] = tensor
            if m.suffix == _LORA_A:
                rank = tensor.shape[0]
                scaling = _scaling(cfg, rel[: -len(_LORA_A)], rank)
                ranks[m.path] = (rank, _alpha_for(cfg, scaling, rank))
            continue
        if m.suffix not in (_LORA_A, _LORA_B, _LORA_B_BIAS):
            raise ValueError(f"only lora_A/lora_B tensors are supported on attention qkv: {key!r}")
        _, parts = pending.setdefault(m.layer, (prefix, {}))
        parts.setdefault(m.part or "qkv", {})[m.suffix] = tensor

    for layer, (prefix, parts) in sorted(pending.items()):
        if to == "glm":
            fused = parts["qkv"]
            if _LORA_A not in fused or _LORA_B not in fused:
                raise ValueError(f"layer {layer}: query_key_value LoRA lacks lora_A or lora_B")
            if dims is None:
                raise ValueError(
                    "splitting a fused query_key_value LoRA needs the ChatGLM model config "
                    "(model_config=...) to know the q/k/v row blocks"
                )
            a = fused[_LORA_A]
            scaling = _scaling(cfg, CHATGLM_QKV.format(i=layer), a.shape[0])
            bs = split_qkv_rows(fused[_LORA_B], dims)
            biases: Sequence[torch.Tensor | None] = (
                split_qkv_rows(fused[_LORA_B_BIAS], dims)
                if _LORA_B_BIAS in fused
                else (None, None, None)
            )
            for p, b, bias in zip(QKV_PARTS, bs, biases, strict=True):
                a_p, b_p = a, b
                if prune_zero_rank:
                    keep = (b != 0).any(dim=0)
                    if bool(keep.any()) and not bool(keep.all()):
                        a_p, b_p = a[keep], b[:, keep]
                mod = GLM_QKV.format(i=layer, p=p)
                out_sd[prefix + mod + _LORA_A] = a_p.clone()
                out_sd[prefix + mod + _LORA_B] = b_p.clone()
                if bias is not None:
                    out_sd[prefix + mod + _LORA_B_BIAS] = bias.clone()
                ranks[mod] = (a_p.shape[0], _alpha_for(cfg, scaling, a_p.shape[0]))
        else:
            loras: dict[str, _Lora] = {}
            for p, tensors in parts.items():
                if _LORA_A not in tensors or _LORA_B not in tensors:
                    raise ValueError(f"layer {layer}: {p}_proj LoRA lacks lora_A or lora_B")
                a = tensors[_LORA_A]
                scaling = _scaling(cfg, GLM_QKV.format(i=layer, p=p), a.shape[0])
                loras[p] = _Lora(a, tensors[_LORA_B], tensors.get(_LORA_B_BIAS), scaling)
            a_f, b_f, bias_f, scaling = _fuse_loras(loras, dims or _infer_mqa_dims(loras))
            mod = CHATGLM_QKV.format(i=layer)
            out_sd[prefix + mod + _LORA_A] = a_f
            out_sd[prefix + mod + _LORA_B] = b_f
            if bias_f is not None:
                out_sd[prefix + mod + _LORA_B_BIAS] = bias_f
            ranks[mod] = (a_f.shape[0], _alpha_for(cfg, scaling, a_f.shape[0]))

    new_cfg = dict(cfg)
    targets = translate_names(cfg.get("target_modules"), to)
    if targets is None:
        targets = dedupe(mod.rpartition(".")[2] for mod in ranks)
    new_cfg["target_modules"] = targets
    if cfg.get("modules_to_save"):
        new_cfg["modules_to_save"] = translate_names(cfg["modules_to_save"], to)
    if cfg.get("exclude_modules") and not isinstance(cfg["exclude_modules"], str):
        new_cfg["exclude_modules"] = translate_names(cfg["exclude_modules"], to)
    new_cfg["rank_pattern"], new_cfg["alpha_pattern"] = _patterns(
        ranks, int(cfg.get("r", 8)), cfg.get("lora_alpha", 8)
    )
    return ConvertedAdapter(state_dict=unshare(out_sd), target_modules=targets, config=new_cfg)


def _infer_mqa_dims(loras: Mapping[str, _Lora]) -> ChatGLMDims:
    """q/k/v row counts from the LoRA B shapes, assuming ChatGLM2/3's multi-query layout
    (``[q; k; v]`` rows). Refuses when that is ambiguous."""
    if "q" not in loras or not {"k", "v"} & set(loras):
        raise ValueError("fusing q/k/v LoRAs without model_config needs q and k or v LoRAs")
    q_rows = loras["q"].b.shape[0]
    kv_rows = (loras["k"] if "k" in loras else loras["v"]).b.shape[0]
    if q_rows == kv_rows:
        raise ValueError(
            "q and k/v have the same size (no multi-query groups?): the fused row layout "
            "is ambiguous, pass model_config"
        )
    return ChatGLMDims(
        num_layers=0,
        hidden_size=loras["q"].a.shape[1],
        ffn_hidden_size=0,
        num_heads=q_rows,  # head_dim=1: only the q/kv row counts matter for [q; k; v]
        num_groups=kv_rows,
        head_dim=1,
        vocab_size=0,
        seq_length=0,
        multi_query=True,
        qkv_bias=False,
        eps=0.0,
        rope_ratio=1.0,
    )


def _fuse_loras(
    loras: Mapping[str, _Lora], dims: ChatGLMDims
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Fuse q/k/v LoRAs (any subset) into one query_key_value LoRA with the same delta W."""
    import torch

    present = [p for p in QKV_PARTS if p in loras]
    first = loras[present[0]]
    rows = {"q": dims.q_rows, "k": dims.kv_rows, "v": dims.kv_rows}
    dtype, device = first.b.dtype, first.b.device

    def zeros_b(p: str, rank: int) -> torch.Tensor:
        return torch.zeros(rows[p], rank, dtype=dtype, device=device)

    shared = all(
        torch.equal(loras[p].a, first.a) and loras[p].scaling == first.scaling for p in present
    )
    if shared:
        a_f = first.a.clone()
        blocks = [loras[p].b if p in loras else zeros_b(p, a_f.shape[0]) for p in QKV_PARTS]
        b_f = fuse_qkv_rows(blocks[0], blocks[1], blocks[2], dims)
    else:
        a_f = torch.cat([loras[p].a for p in present], dim=0)
        total = a_f.shape[0]
        full: dict[str, torch.Tensor] = {}
        col = 0
        for p in present:
            lora = loras[p]
            r = lora.a.shape[0]
            block = zeros_b(p, total)
            b = lora.b
            if lora.scaling != first.scaling:
                b = (b.float() * (lora.scaling / first.scaling)).to(dtype)
            block[:, col : col + r] = b
            full[p] = block
            col += r
        blocks = [full.get(p, zeros_b(p, total)) for p in QKV_PARTS]
        b_f = fuse_qkv_rows(blocks[0], blocks[1], blocks[2], dims)
    bias_f: torch.Tensor | None = None
    if any(loras[p].bias is not None for p in present):
        bias_parts: list[torch.Tensor] = []
        for p in QKV_PARTS:
            bias = loras[p].bias if p in loras else None
            bias_parts.append(
                bias if bias is not None else torch.zeros(rows[p], dtype=dtype, device=device)
            )
        bias_f = fuse_qkv_rows(bias_parts[0], bias_parts[1], bias_parts[2], dims)
    return a_f, b_f, bias_f, first.scaling


def _pattern_for(
    values: Mapping[str, float], default: float, by_leaf: Mapping[str, list[str]]
) -> dict[str, float]:
    pattern: dict[str, float] = {}
    for leaf, mods in by_leaf.items():
        distinct = {values[m] for m in mods}
        if distinct == {default}:
            continue
        if len(distinct) == 1:  # every module with this leaf name agrees: a short key
            pattern[leaf] = distinct.pop()
        else:
            pattern.update({m: values[m] for m in mods if values[m] != default})
    return pattern


def _patterns(
    ranks: Mapping[str, tuple[int, float | int]], r: int, alpha: float | int
) -> tuple[dict[str, int], dict[str, float | int]]:
    """peft rank/alpha patterns for modules whose values differ from the global ``r``/``alpha``:
    keyed by leaf name when all modules of that leaf agree, else by full module path."""
    by_leaf: dict[str, list[str]] = {}
    for mod in ranks:
        by_leaf.setdefault(mod.rpartition(".")[2], []).append(mod)
    rank_values = {m: float(v[0]) for m, v in ranks.items()}
    alpha_values = {m: float(v[1]) for m, v in ranks.items()}
    rank_pattern = {k: int(v) for k, v in _pattern_for(rank_values, r, by_leaf).items()}
    alpha_pattern = {
        k: _int_if_integral(v) for k, v in _pattern_for(alpha_values, alpha, by_leaf).items()
    }
    return rank_pattern, alpha_pattern


def _int_if_integral(x: float) -> float | int:
    return round(x) if abs(x - round(x)) < 1e-9 else x


def glm_adapter_to_chatglm(
    adapter_sd: Mapping[str, torch.Tensor],
    lora_config: Any,
    *,
    model_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str] | str]:
    """GLM-named LoRA -> ChatGLM3 names: ``(state_dict, target_modules)``.

    See :func:`convert_adapter` for the exact q/k/v fusion. When the q/k/v ``A`` matrices
    differ, the fused rank grows, so write the adapter config from
    :func:`convert_adapter` (or use :func:`convert_adapter_dir`), which carries the
    matching ``rank_pattern``/``alpha_pattern``.
    """
    res = convert_adapter(adapter_sd, lora_config, to="chatglm", model_config=model_config)
    return res.state_dict, res.target_modules


def chatglm_adapter_to_glm(
    adapter_sd: Mapping[str, torch.Tensor],
    lora_config: Any,
    *,
    model_config: Mapping[str, Any],
    prune_zero_rank: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str] | str]:
    """ChatGLM3-named LoRA -> GLM names: ``(state_dict, target_modules)``; exact.

    ``model_config`` is the ChatGLM ``config.json`` dict (needed for the q/k/v row split).
    """
    res = convert_adapter(
        adapter_sd,
        lora_config,
        to="glm",
        model_config=model_config,
        prune_zero_rank=prune_zero_rank,
    )
    return res.state_dict, res.target_modules


def convert_adapter_dir(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Literal["glm", "chatglm"],
    model_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a saved peft adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``/``.bin``) and write the result to ``dst`` atomically.

    ``model_config`` is the ChatGLM config dict or a path to its checkpoint dir/config.json.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    if (src / "adapter_model.safetensors").is_file():
        sd = load_file(str(src / "adapter_model.safetensors"))
    else:
        sd = load_shard(src / "adapter_model.bin")
    mcfg: Mapping[str, Any] | None
    if model_config is None or isinstance(model_config, Mapping):
        mcfg = model_config
    else:
        mcfg = read_config(Path(model_config))
        if mcfg is None:
            raise FileNotFoundError(f"no readable ChatGLM config at {model_config}")
    res = convert_adapter(sd, cfg, to=to, model_config=mcfg)
    new_cfg = res.config
    if base_model_name_or_path is not None:
        new_cfg["base_model_name_or_path"] = base_model_name_or_path
    with AtomicDir(dst, overwrite=overwrite) as tmp:
        save_file(res.state_dict, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2, default=str) + "\n")
    return dst

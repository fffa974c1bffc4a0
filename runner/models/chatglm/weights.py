"""ChatGLM-layout state dicts <-> ``GlmForCausalLM`` state dicts.

``query_key_value`` rows are ``[q (heads*head_dim), k (groups*head_dim), v (groups*head_dim)]``
with ``multi_query_attention``; without it they are interleaved per head,
``heads x [q_h, k_h, v_h]`` (each ``head_dim`` rows). ``dense_h_to_4h`` is ``[gate; up]``, the
same as GLM's ``gate_up_proj``. The tests check these conversions against
tests/chatglm_reference.py (source tree only), a readable forward pass over the original layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from runner.models.chatglm.config import ChatGLMDims
from runner.models.chatglm.names import CHATGLM_QKV, GLM_QKV, INV_FREQ_KEY, QKV_PARTS, match_module

if TYPE_CHECKING:
    import torch


def split_qkv_rows(t: torch.Tensor, dims: ChatGLMDims) -> tuple[torch.Tensor, ...]:
    """Split the fused qkv output rows (dim 0) of a weight, bias or LoRA B into q, k, v."""
    if t.shape[0] != dims.qkv_rows:
        raise ValueError(f"query_key_value has {t.shape[0]} rows, expected {dims.qkv_rows}")
    if dims.multi_query:
        return tuple(t.split([dims.q_rows, dims.kv_rows, dims.kv_rows], dim=0))
    per_head = t.reshape(dims.num_heads, 3, dims.head_dim, *t.shape[1:])
    return tuple(per_head[:, j].reshape(dims.q_rows, *t.shape[1:]) for j in range(3))


def fuse_qkv_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: ChatGLMDims
) -> torch.Tensor:
    """Inverse of :func:`split_qkv_rows`."""
    import torch

    if dims.multi_query:
        return torch.cat([q, k, v], dim=0)
    rest = q.shape[1:]
    parts = [x.reshape(dims.num_heads, 1, dims.head_dim, *rest) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(dims.qkv_rows, *rest)


def convert_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename/split a ChatGLM-layout state dict into ``GlmForCausalLM`` keys.

    Works on any subset of the keys (one shard at a time is fine): every key maps on its
    own. ``rotary_pos_emb.inv_freq`` is dropped (GLM recomputes it); any other unknown key
    raises ``ValueError``. Dtypes are kept; split q/k/v tensors are copies.
    """
    dims = ChatGLMDims.from_config(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key == INV_FREQ_KEY:
            continue
        m = match_module(key, "glm")
        if m is None or m.suffix not in (".weight", ".bias"):
            raise ValueError(f"unexpected key in ChatGLM checkpoint: {key!r}")
        if m.kind == "plain":
            out[m.path + m.suffix] = tensor
            continue
        for part, piece in zip(QKV_PARTS, split_qkv_rows(tensor, dims), strict=True):
            out[GLM_QKV.format(i=m.layer, p=part) + m.suffix] = piece.clone()
    return out


def glm_state_dict_to_chatglm(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_state_dict` (e.g. to hand merged weights back to ChatGLM3
    code). Needs the q, k and v tensors of a layer together."""
    dims = ChatGLMDims.from_config(cfg)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        m = match_module(key, "chatglm")
        if m is None or m.suffix not in (".weight", ".bias"):
            raise ValueError(f"unexpected key in GLM state dict: {key!r}")
        if m.kind == "plain":
            out[m.path + m.suffix] = tensor
        else:
            qkv.setdefault((m.layer, m.suffix), {})[m.part] = tensor
    for (layer, suffix), parts in sorted(qkv.items()):
        if set(parts) != set(QKV_PARTS):
            raise ValueError(f"layer {layer}: need q, k and v {suffix}, got {sorted(parts)}")
        fused = fuse_qkv_rows(parts["q"], parts["k"], parts["v"], dims)
        out[CHATGLM_QKV.format(i=layer) + suffix] = fused
    return out

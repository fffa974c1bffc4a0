"""A small, readable ChatGLM2/3 forward pass in plain torch: the ground truth for tests.

It loads a ChatGLM-layout state dict (``transformer.embedding.word_embeddings.weight``,
``transformer.encoder.layers.{i}.self_attention.query_key_value.weight``, ...) as is and
computes logits the way THUDM's ``modeling_chatglm.py`` does (fp32 path, no cache, no
padding mask). It is deliberately independent of transformers' GLM code, so the conversion
in :mod:`runner.models.chatglm` is checked against an implementation of the original
layout rather than against itself.

A test oracle, so it lives under tests/ and is not in the wheel; it imports torch at import
time, which nothing under runner/ may.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runner.models.chatglm.config import ChatGLMDims

__all__ = ["ChatGLMReference"]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2j], x[2j+1])`` of the first ``2 * cos.shape[-1]`` dims.

    ``x``: ``[batch, seq, heads, head_dim]``; ``cos``/``sin``: ``[seq, n_pairs]``.
    """
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


class _SelfAttention(nn.Module):
    def __init__(self, dims: ChatGLMDims) -> None:
        super().__init__()
        self.dims = dims
        self.query_key_value = nn.Linear(dims.hidden_size, dims.qkv_rows, bias=dims.qkv_bias)
        self.dense = nn.Linear(dims.q_rows, dims.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = self.dims
        batch, seq, _ = x.shape
        mixed = self.query_key_value(x)
        if d.multi_query:
            # rows: [all query heads | key groups | value groups]
            q, k, v = mixed.split([d.q_rows, d.kv_rows, d.kv_rows], dim=-1)
            q = q.view(batch, seq, d.num_heads, d.head_dim)
            k = k.view(batch, seq, d.num_groups, d.head_dim)
            v = v.view(batch, seq, d.num_groups, d.head_dim)
        else:
            # rows: per head [q_h | k_h | v_h]
            per_head = mixed.view(batch, seq, d.num_heads, 3 * d.head_dim)
            q, k, v = per_head.chunk(3, dim=-1)
        q = _rotate_interleaved(q, cos, sin)
        k = _rotate_interleaved(k, cos, sin)
        # each key/value group serves num_heads // num_groups consecutive query heads
        rep = d.num_heads // d.num_groups
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        scores = (q @ k.transpose(-1, -2)) / d.head_dim**0.5
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        context = (probs @ v).transpose(1, 2).reshape(batch, seq, d.q_rows)
        return self.dense(context)


class _MLP(nn.Module):
    def __init__(self, dims: ChatGLMDims) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dims.hidden_size, 2 * dims.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(dims.ffn_hidden_size, dims.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # SwiGLU: silu(first half) * second
        return self.dense_4h_to_h(F.silu(gate) * up)


class _Block(nn.Module):
    def __init__(self, dims: ChatGLMDims) -> None:
        super().__init__()
        self.input_layernorm = _RMSNorm(dims.hidden_size, dims.eps)
        self.self_attention = _SelfAttention(dims)
        self.post_attention_layernorm = _RMSNorm(dims.hidden_size, dims.eps)
        self.mlp = _MLP(dims)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Embedding(nn.Module):
    def __init__(self, dims: ChatGLMDims) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(dims.vocab_size, dims.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, dims: ChatGLMDims) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(dims) for _ in range(dims.num_layers))
        self.final_layernorm = _RMSNorm(dims.hidden_size, dims.eps)


class _Transformer(nn.Module):
    def __init__(self, dims: ChatGLMDims) -> None:
        super().__init__()
        self.embedding = _Embedding(dims)
        self.encoder = _Encoder(dims)
        self.output_layer = nn.Linear(dims.hidden_size, dims.vocab_size, bias=False)


class ChatGLMReference(nn.Module):
    """ChatGLM2/3 causal LM with the original module names (``transformer.*``).

    ``ChatGLMReference(cfg)`` builds it from a ChatGLM ``config.json`` dict;
    :meth:`load_chatglm_state_dict` loads a checkpoint's tensors (strict, except that the
    stored ``rotary_pos_emb.inv_freq`` is ignored: frequencies are recomputed in fp32 from
    ``kv_channels`` and ``rope_ratio``). ``forward(input_ids)`` returns logits.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.dims = ChatGLMDims.from_config(cfg)
        self.transformer = _Transformer(self.dims)

    @classmethod
    def from_state_dict(
        cls, cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
    ) -> ChatGLMReference:
        model = cls(cfg)
        model.load_chatglm_state_dict(state_dict)
        return model.eval()

    def load_chatglm_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_pos_emb.inv_freq")}
        self.load_state_dict(sd, strict=True)

    def rotary_tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[seq, head_dim // 4]``: ``head_dim // 2`` rotated dims, one angle per pair."""
        rot = self.dims.head_dim // 2
        base = 10000.0 * self.dims.rope_ratio
        inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
        angles = positions.float()[:, None] * inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.embedding.word_embeddings(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary_tables(positions, x.dtype)
        for layer in t.encoder.layers:
            x = layer(x, cos, sin)
        return t.output_layer(t.encoder.final_layernorm(x))

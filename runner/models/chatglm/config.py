"""A ChatGLM2/3 ``config.json``: the tensor layout it implies and the equivalent ``GlmConfig``.

Rotary: ``head_dim // 2`` rotated dims, adjacent pairs, base ``10000 * rope_ratio``; GLM does
the same with ``partial_rotary_factor=0.5``, so no weight permutation is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GlmConfig

_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class ChatGLMDims:
    """The parts of a ChatGLM2/3 ``config.json`` that determine the tensor layout."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int  # key/value heads
    head_dim: int
    vocab_size: int
    seq_length: int
    multi_query: bool
    qkv_bias: bool
    eps: float
    rope_ratio: float

    @property
    def q_rows(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.num_groups * self.head_dim

    @property
    def qkv_rows(self) -> int:
        return self.q_rows + 2 * self.kv_rows

    @property
    def rope_theta(self) -> float:
        return _ROPE_BASE * self.rope_ratio

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ChatGLMDims:
        """Parse and validate a ChatGLM config dict (the remote ``ChatGLMConfig`` fields)."""
        if "position_encoding_2d" in cfg or "inner_hidden_size" in cfg:
            raise ValueError(
                "this is a first-generation ChatGLM-6B config (2D positions, GLM-130B layout); "
                "only the ChatGLM2/ChatGLM3 layout is supported"
            )
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"ChatGLM config lacks {missing}")
        # Parts of the remote architecture that GLM cannot express: refuse rather than
        # produce a silently different model.
        unsupported = {
            "rmsnorm": (cfg.get("rmsnorm", True), True),
            "add_bias_linear": (cfg.get("add_bias_linear", False), False),
            "apply_residual_connection_post_layernorm": (
                cfg.get("apply_residual_connection_post_layernorm", False),
                False,
            ),
            "post_layer_norm": (cfg.get("post_layer_norm", True), True),
            "original_rope": (cfg.get("original_rope", True), True),
        }
        bad = {k: v for k, (v, ok) in unsupported.items() if bool(v) != ok}
        if bad:
            raise ValueError(f"unsupported ChatGLM config values (GLM cannot represent): {bad}")
        if cfg.get("pre_seq_len"):
            raise ValueError("P-tuning v2 checkpoints (pre_seq_len) are not supported")

        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("kv_channels") or hidden // heads)
        multi_query = bool(cfg.get("multi_query_attention", False))
        groups = int(cfg.get("multi_query_group_num", heads)) if multi_query else heads
        if heads % groups:
            raise ValueError(f"num_attention_heads={heads} not divisible by groups={groups}")
        if head_dim % 4:
            raise ValueError(f"kv_channels={head_dim} must be divisible by 4 (half-rotary pairs)")
        vocab = cfg.get("padded_vocab_size", cfg.get("vocab_size"))
        if vocab is None:
            raise ValueError("ChatGLM config lacks padded_vocab_size")
        rope_ratio = cfg.get("rope_ratio")
        return cls(
            num_layers=int(cfg["num_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg.get("ffn_hidden_size") or 4 * hidden),
            num_heads=heads,
            num_groups=groups,
            head_dim=head_dim,
            vocab_size=int(vocab),
            seq_length=int(cfg.get("seq_length", 2048)),
            multi_query=multi_query,
            qkv_bias=bool(cfg.get("add_qkv_bias", False)),
            eps=float(cfg.get("layernorm_epsilon", 1e-5)),
            rope_ratio=float(rope_ratio) if rope_ratio is not None else 1.0,
        )


def chatglm_config_to_glm(
    cfg: Mapping[str, Any], *, eos_token_ids: Sequence[int] | None = None
) -> GlmConfig:
    """Translate a ChatGLM2/3 ``config.json`` dict into an equivalent ``GlmConfig``.

    ``eos_token_ids`` defaults to the config's ``eos_token_id`` (2 for ChatGLM3);
    ``checkpoint.convert_checkpoint`` adds the ``<|user|>`` and ``<|observation|>`` ids, at
    which ChatGLM3's own ``chat()`` stops generating.
    """
    from transformers import GlmConfig

    dims = ChatGLMDims.from_config(cfg)
    if eos_token_ids is None:
        raw = cfg.get("eos_token_id", 2)
        eos_token_ids = list(raw) if isinstance(raw, list | tuple) else [int(raw)]
    eos: int | list[int] = list(eos_token_ids) if len(eos_token_ids) > 1 else int(eos_token_ids[0])
    kwargs: dict[str, Any] = {
        "vocab_size": dims.vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.ffn_hidden_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_groups,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": dims.seq_length,
        "rms_norm_eps": dims.eps,
        "attention_bias": dims.qkv_bias,
        "attention_dropout": float(cfg.get("attention_dropout", 0.0) or 0.0),
        "tie_word_embeddings": False,
        "pad_token_id": int(cfg.get("pad_token_id", 0) or 0),
        "eos_token_id": eos,
        "bos_token_id": None,
        "use_cache": True,
        # Legacy keyword names, understood by every supported transformers
        # (docs/compatibility.md).
        "rope_theta": dims.rope_theta,
        "partial_rotary_factor": 0.5,
    }
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(dtype, str):
        kwargs["dtype"] = dtype
    config = GlmConfig(**kwargs)
    config.architectures = ["GlmForCausalLM"]
    return config

"""ChatGLM2/3 checkpoints on transformers' native ``GlmForCausalLM``.

THUDM/chatglm3-6b ships remote code that no longer runs on transformers 5.x, but its
architecture is exactly transformers' GLM: pre-RMSNorm decoder, fused and biased qkv with
multi-query groups, rotary embedding on the first half of every head with interleaved
(adjacent) pairs, SwiGLU MLP with a fused gate/up projection and an untied output layer.
This module converts such a checkpoint (weights, config and SentencePiece tokenizer) into a
native GLM checkpoint, with no remote code involved, and converts LoRA adapters between
the two naming schemes so that an adapter trained on the native model can be used with
the original ChatGLM3 code (and back).

Layout facts the conversion relies on (see ``chatglm_reference.py`` for a readable forward):

* ``query_key_value`` rows are ``[q (heads*head_dim), k (groups*head_dim), v (groups*head_dim)]``
  with ``multi_query_attention``; without it they are interleaved per head,
  ``heads x [q_h, k_h, v_h]`` (each ``head_dim`` rows).
* ``dense_h_to_4h`` is ``[gate; up]``, the same as GLM's ``gate_up_proj``.
* Rotary: ``head_dim // 2`` rotated dims, adjacent pairs, base ``10000 * rope_ratio``; GLM does
  the same with ``partial_rotary_factor=0.5``, so no weight permutation is needed.

torch / transformers / tokenizers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import GlmConfig, PreTrainedTokenizerFast

__all__ = [
    "CHATGLM3_CHAT_TEMPLATE",
    "CHATGLM3_SPECIAL_TOKENS",
    "CHATGLM_TO_GLM_TARGETS",
    "GLM_TO_CHATGLM_TARGETS",
    "ChatGLMDims",
    "ConvertedAdapter",
    "chatglm_adapter_to_glm",
    "chatglm_config_to_glm",
    "convert_adapter",
    "convert_adapter_dir",
    "convert_checkpoint",
    "convert_state_dict",
    "encode_chatglm3_messages",
    "glm_adapter_to_chatglm",
    "glm_state_dict_to_chatglm",
    "is_chatglm_checkpoint",
    "load_chatglm_tokenizer",
    "translate_target_modules",
    "translate_target_modules_to_chatglm",
]

# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

#: Special tokens ChatGLM3 appends after the SentencePiece vocabulary, in id order.
CHATGLM3_SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)

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
    :func:`convert_checkpoint` adds the ``<|user|>`` and ``<|observation|>`` ids, at which
    ChatGLM3's own ``chat()`` stops generating.
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
        # Legacy keyword names: transformers 5 folds them into ``rope_parameters`` and
        # 4.x reads them directly.
        "rope_theta": dims.rope_theta,
        "partial_rotary_factor": 0.5,
    }
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(dtype, str):
        kwargs["dtype"] = dtype
    config = GlmConfig(**kwargs)
    config.architectures = ["GlmForCausalLM"]
    return config


# --------------------------------------------------------------------------------------
# Module-name mapping (shared by base weights and adapters)
# --------------------------------------------------------------------------------------

# (ChatGLM module path, GLM module path); "{i}" is a layer index. query_key_value is
# special-cased (one fused module <-> q_proj/k_proj/v_proj).
_MODULE_PAIRS: tuple[tuple[str, str], ...] = (
    ("transformer.embedding.word_embeddings", "model.embed_tokens"),
    ("transformer.encoder.layers.{i}.input_layernorm", "model.layers.{i}.input_layernorm"),
    (
        "transformer.encoder.layers.{i}.post_attention_layernorm",
        "model.layers.{i}.post_attention_layernorm",
    ),
    ("transformer.encoder.layers.{i}.self_attention.dense", "model.layers.{i}.self_attn.o_proj"),
    ("transformer.encoder.layers.{i}.mlp.dense_h_to_4h", "model.layers.{i}.mlp.gate_up_proj"),
    ("transformer.encoder.layers.{i}.mlp.dense_4h_to_h", "model.layers.{i}.mlp.down_proj"),
    ("transformer.encoder.final_layernorm", "model.norm"),
    ("transformer.output_layer", "lm_head"),
)
_CHATGLM_QKV = "transformer.encoder.layers.{i}.self_attention.query_key_value"
_GLM_QKV = "model.layers.{i}.self_attn.{p}_proj"
_QKV_PARTS = ("q", "k", "v")
_INV_FREQ_KEY = "transformer.rotary_pos_emb.inv_freq"


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = (
        re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[qkv])")
    )
    # The module path must end at a component boundary.
    return re.compile(pattern + r"(?=\.|$)")


_C2G = [(_template_regex(c), g) for c, g in _MODULE_PAIRS]
_G2C = [(_template_regex(g), c) for c, g in _MODULE_PAIRS]
_CHATGLM_QKV_RE = _template_regex(_CHATGLM_QKV)
_GLM_QKV_RE = _template_regex(_GLM_QKV)


@dataclass(frozen=True)
class _Match:
    kind: Literal["plain", "qkv"]
    path: str  # translated module path ("" for qkv: depends on the part)
    layer: int
    suffix: str  # ".weight", ".lora_A.weight", ...
    part: str = ""  # q/k/v for GLM-side qkv keys


def _match_module(key: str, to: Literal["glm", "chatglm"]) -> _Match | None:
    """Find which known module ``key`` (relative to the model root) belongs to."""
    table = _C2G if to == "glm" else _G2C
    qkv_re = _CHATGLM_QKV_RE if to == "glm" else _GLM_QKV_RE
    m = qkv_re.match(key)
    if m:
        return _Match("qkv", "", int(m.group("i")), key[m.end() :], m.groupdict().get("p") or "")
    for regex, template in table:
        m = regex.match(key)
        if m:
            layer = m.groupdict().get("i")
            path = template.format(i=layer) if layer is not None else template
            return _Match("plain", path, int(layer) if layer else -1, key[m.end() :])
    return None


#: ChatGLM module leaf names -> native GLM names (LoRA ``target_modules``).
CHATGLM_TO_GLM_TARGETS: dict[str, list[str]] = {
    "query_key_value": ["q_proj", "k_proj", "v_proj"],
    "dense": ["o_proj"],
    "dense_h_to_4h": ["gate_up_proj"],
    "dense_4h_to_h": ["down_proj"],
}
#: Native GLM leaf names -> ChatGLM names.
GLM_TO_CHATGLM_TARGETS: dict[str, str] = {
    "q_proj": "query_key_value",
    "k_proj": "query_key_value",
    "v_proj": "query_key_value",
    "o_proj": "dense",
    "gate_up_proj": "dense_h_to_4h",
    "down_proj": "dense_4h_to_h",
}
# Non-LoRA module names (modules_to_save and the like).
_CHATGLM_TO_GLM_OTHER = {
    "output_layer": "lm_head",
    "embedding": "embed_tokens",
    "word_embeddings": "embed_tokens",
    "final_layernorm": "norm",
    "self_attention": "self_attn",
}
_GLM_TO_CHATGLM_OTHER = {
    "lm_head": "output_layer",
    "embed_tokens": "word_embeddings",
    "norm": "final_layernorm",
    "self_attn": "self_attention",
}


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _translate_names(
    names: str | Iterable[str] | None, to: Literal["glm", "chatglm"]
) -> str | list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        if names == "all-linear":
            return names
        raise ValueError(
            f"target_modules given as a regular expression ({names!r}) cannot be translated; "
            "pass a list of module names"
        )
    out: list[str] = []
    for name in names:
        head, _, leaf = name.rpartition(".")
        if head:  # a dotted path: translate it as a whole module path
            out.extend(_translate_path(name, to))
            continue
        if to == "glm":
            out.extend(CHATGLM_TO_GLM_TARGETS.get(leaf) or [_CHATGLM_TO_GLM_OTHER.get(leaf, leaf)])
        else:
            out.append(GLM_TO_CHATGLM_TARGETS.get(leaf) or _GLM_TO_CHATGLM_OTHER.get(leaf, leaf))
    return _dedupe(out)


def _translate_path(path: str, to: Literal["glm", "chatglm"]) -> list[str]:
    m = _match_module(path, to)
    if m is None or m.suffix:
        raise ValueError(f"cannot translate module path {path!r} to {to} naming")
    if m.kind == "plain":
        return [m.path]
    if to == "glm":
        return [_GLM_QKV.format(i=m.layer, p=p) for p in _QKV_PARTS]
    return [_CHATGLM_QKV.format(i=m.layer)]


def translate_target_modules(names: str | Iterable[str]) -> list[str]:
    """Translate ChatGLM LoRA target names to native GLM names.

    ``query_key_value`` becomes ``q_proj, k_proj, v_proj`` (see
    :data:`CHATGLM_TO_GLM_TARGETS`); names that are already GLM names pass through, dotted
    module paths are translated as paths, duplicates are dropped (order kept).
    ``"all-linear"`` passes through; other strings (peft regexes) raise ``ValueError``.
    """
    out = _translate_names(names, "glm")
    return [out] if isinstance(out, str) else list(out or [])


def translate_target_modules_to_chatglm(names: str | Iterable[str]) -> list[str]:
    """The reverse of :func:`translate_target_modules` (``q_proj``/``k_proj``/``v_proj`` ->
    ``query_key_value`` and so on)."""
    out = _translate_names(names, "chatglm")
    return [out] if isinstance(out, str) else list(out or [])


# --------------------------------------------------------------------------------------
# Base weights
# --------------------------------------------------------------------------------------


def _split_qkv_rows(t: torch.Tensor, dims: ChatGLMDims) -> tuple[torch.Tensor, ...]:
    """Split the fused qkv output rows (dim 0) of a weight, bias or LoRA B into q, k, v."""
    if t.shape[0] != dims.qkv_rows:
        raise ValueError(f"query_key_value has {t.shape[0]} rows, expected {dims.qkv_rows}")
    if dims.multi_query:
        return tuple(t.split([dims.q_rows, dims.kv_rows, dims.kv_rows], dim=0))
    per_head = t.reshape(dims.num_heads, 3, dims.head_dim, *t.shape[1:])
    return tuple(per_head[:, j].reshape(dims.q_rows, *t.shape[1:]) for j in range(3))


def _fuse_qkv_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: ChatGLMDims
) -> torch.Tensor:
    """Inverse of :func:`_split_qkv_rows`."""
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
        if key == _INV_FREQ_KEY:
            continue
        m = _match_module(key, "glm")
        if m is None or m.suffix not in (".weight", ".bias"):
            raise ValueError(f"unexpected key in ChatGLM checkpoint: {key!r}")
        if m.kind == "plain":
            out[m.path + m.suffix] = tensor
            continue
        for part, piece in zip(_QKV_PARTS, _split_qkv_rows(tensor, dims), strict=True):
            out[_GLM_QKV.format(i=m.layer, p=part) + m.suffix] = piece.clone()
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
        m = _match_module(key, "chatglm")
        if m is None or m.suffix not in (".weight", ".bias"):
            raise ValueError(f"unexpected key in GLM state dict: {key!r}")
        if m.kind == "plain":
            out[m.path + m.suffix] = tensor
        else:
            qkv.setdefault((m.layer, m.suffix), {})[m.part] = tensor
    for (layer, suffix), parts in sorted(qkv.items()):
        if set(parts) != set(_QKV_PARTS):
            raise ValueError(f"layer {layer}: need q, k and v {suffix}, got {sorted(parts)}")
        fused = _fuse_qkv_rows(parts["q"], parts["k"], parts["v"], dims)
        out[_CHATGLM_QKV.format(i=layer) + suffix] = fused
    return out


# --------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any] | None:
    cfg_path = path if path.is_file() else path / "config.json"
    try:
        with cfg_path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_chatglm_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (a directory or its ``config.json``) is a ChatGLM checkpoint:
    ``model_type == "chatglm"`` or a ChatGLM architecture name."""
    cfg = _read_config(Path(path))
    if cfg is None:
        return False
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") == "chatglm" or any(
        a in ("ChatGLMModel", "ChatGLMForConditionalGeneration") for a in archs
    )


def _weight_shards(src: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred, in index order when indexed."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [src / name for name in _dedupe(weight_map.values())]
        if (src / single).is_file():
            return [src / single]
    found = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not found:
        raise FileNotFoundError(f"no safetensors or pytorch_model*.bin weights in {src}")
    return found


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    # weights_only: never unpickle arbitrary objects; mmap keeps big shards off the heap
    # (only possible for the zip format, which every torch since 1.6 writes).
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return obj


def _unshare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage: clone all but the first user."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(ptr)
        out[key] = t
    return out


@dataclass
class _AtomicDir:
    """Build a directory next to ``dst`` and move it into place only when complete."""

    dst: Path
    overwrite: bool = False
    tmp: Path = field(init=False)

    def __enter__(self) -> Path:
        if self.dst.exists() and not self.overwrite:
            raise FileExistsError(f"{self.dst} exists (pass overwrite=True to replace it)")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old: Path | None = None
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    max_shard_size: int = 5 * 1024**3,
) -> Path:
    """Convert a ChatGLM2/3 checkpoint directory into a native GLM checkpoint at ``dst``.

    Reads ``config.json``, safetensors or ``pytorch_model*.bin`` shards (``torch.load`` with
    ``weights_only=True``; no remote code is imported or run) and ``tokenizer.model``.
    Writes ``config.json``, ``generation_config.json``, ``model*.safetensors`` (+ index when
    sharded, the ``save_pretrained`` layout) and a fast tokenizer. Shards are converted one
    at a time to bound memory. ``dst`` appears atomically (temp dir + rename).
    """
    src, dst = Path(src), Path(dst)
    cfg = _read_config(src)
    if cfg is None:
        raise FileNotFoundError(f"no readable config.json in {src}")
    if not is_chatglm_checkpoint(src):
        raise ValueError(
            f"{src} is not a ChatGLM checkpoint (model_type={cfg.get('model_type')!r})"
        )
    dims = ChatGLMDims.from_config(cfg)
    sp_model = src / "tokenizer.model"
    if not sp_model.is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.model (SentencePiece) to convert")

    from transformers import GenerationConfig

    tokenizer = load_chatglm_tokenizer(sp_model, model_max_length=dims.seq_length)
    vocab = tokenizer.get_vocab()
    stop_ids = _dedupe_ints([tokenizer.eos_token_id, vocab["<|user|>"], vocab["<|observation|>"]])
    if max(stop_ids) >= dims.vocab_size or len(tokenizer) > dims.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {dims.vocab_size}"
        )
    config = chatglm_config_to_glm(cfg, eos_token_ids=stop_ids)

    with _AtomicDir(dst, overwrite=overwrite) as tmp:
        _write_weights(_weight_shards(src), cfg, dims, tmp, max_shard_size)
        config.save_pretrained(tmp)
        GenerationConfig(eos_token_id=stop_ids, pad_token_id=config.pad_token_id).save_pretrained(
            tmp
        )
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        for lic in [*src.glob("*LICENSE*"), *src.glob("*License*")]:
            if lic.is_file():
                shutil.copy2(lic, tmp / lic.name)
    return dst


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 writes ``TokenizersBackend``, a name 4.x cannot load; the
    ``PreTrainedTokenizerFast`` alias loads the same tokenizer.json on both."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _dedupe_ints(values: Iterable[int | None]) -> list[int]:
    return list(dict.fromkeys(int(v) for v in values if v is not None))


def _write_weights(
    shards: list[Path],
    cfg: Mapping[str, Any],
    dims: ChatGLMDims,
    out_dir: Path,
    max_shard_size: int,
) -> None:
    from safetensors.torch import save_file

    def groups() -> Iterator[dict[str, torch.Tensor]]:
        # Convert input shards one by one; re-chunk to at most ``max_shard_size`` bytes.
        pending: dict[str, torch.Tensor] = {}
        size = 0
        for shard in shards:
            for key, t in convert_state_dict(_load_shard(shard), cfg).items():
                nbytes = t.numel() * t.element_size()
                if pending and size + nbytes > max_shard_size:
                    yield pending
                    pending, size = {}, 0
                pending[key] = t
                size += nbytes
        if pending:
            yield pending

    written: list[tuple[str, list[str]]] = []
    total = 0
    seen: set[str] = set()
    for i, group in enumerate(groups()):
        name = f"model-part-{i:05d}.safetensors"
        group = _unshare(group)
        dup = seen.intersection(group)
        if dup:
            raise ValueError(f"duplicate tensors across shards: {sorted(dup)[:3]}")
        seen.update(group)
        total += sum(t.numel() * t.element_size() for t in group.values())
        save_file(group, str(out_dir / name), metadata={"format": "pt"})
        written.append((name, list(group)))

    expected = _expected_glm_keys(dims)
    if seen != expected:
        missing, extra = sorted(expected - seen), sorted(seen - expected)
        raise ValueError(
            f"converted weights incomplete: missing {missing[:5]}, unexpected {extra[:5]}"
        )

    if len(written) == 1:
        os.replace(out_dir / written[0][0], out_dir / "model.safetensors")
        return
    n = len(written)
    weight_map: dict[str, str] = {}
    for i, (name, keys) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / name, out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _expected_glm_keys(dims: ChatGLMDims) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        keys |= {
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_up_proj.weight",
            p + "mlp.down_proj.weight",
        }
        for part in _QKV_PARTS:
            keys.add(p + f"self_attn.{part}_proj.weight")
            if dims.qkv_bias:
                keys.add(p + f"self_attn.{part}_proj.bias")
    return keys


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

#: ChatGLM3's prompt format: ``[gMASK]sop`` then, per message, ``<|role|>{metadata}\n {content}``;
#: the generation prompt is a bare ``<|assistant|>`` (the model writes the ``\n`` itself).
#: Equivalent to the template THUDM published in chatglm3-6b's tokenizer_config.json, plus the
#: optional ``metadata`` field and ``tools`` on a system message that ChatGLM3's
#: ``build_chat_input`` supports, and the ``tool`` role as an alias of ``observation``.
CHATGLM3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}[gMASK]sop{%- endif -%}"
    "{%- set role = 'observation' if message['role'] == 'tool' else message['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{ raise_exception('ChatGLM3 has no role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- set content = message['content'] -%}"
    "{%- if role == 'system' and message.get('tools') -%}"
    "{%- set content = content ~ '\n' ~ (message['tools'] | tojson(indent=4)) -%}"
    "{%- endif -%}"
    "<|{{ role }}|>{{ message.get('metadata') or '' }}\n {{ content }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# SentencePiece ModelProto.SentencePiece.Type values.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _read_sp_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2

        model_pb2: Any = sentencepiece_model_pb2
    except ImportError:  # pragma: no cover - old sentencepiece without the bundled proto
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    data = path.read_bytes()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(
            f"{path} is not a SentencePiece model (GLM-4's tiktoken tokenizer is not supported)"
        ) from exc
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def _unigram_model(pieces: list[Any], trainer: Any) -> Any:
    from tokenizers.models import Unigram

    normal = [float(p.score) for p in pieces if p.type == _SP_NORMAL]
    # Pieces SentencePiece never puts in the lattice (control, unused, byte, unk) get a score
    # that loses every comparison; user-defined pieces get SentencePiece's bonus,
    # length * max_score - 0.1, where its max_score starts from FLT_MIN (the smallest positive
    # float), so with the usual negative scores the bonus is about -0.1.
    max_score = max([1.17549435e-38, *normal])
    never = min(normal, default=0.0) - 1000.0

    def lattice_score(p: Any) -> float:
        if p.type == _SP_NORMAL:
            return float(p.score)
        if p.type == _SP_USER_DEFINED:
            return len(p.piece) * max_score - 0.1
        return never

    vocab = [(p.piece, lattice_score(p)) for p in pieces]
    return Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)


def _bpe_model(pieces: list[Any], trainer: Any, *, has_user_defined: bool) -> Any:
    from tokenizers.models import BPE

    normal = {p.piece: (float(p.score), i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
    # SentencePiece repeatedly merges the adjacent pair whose concatenation is the best-scoring
    # piece; as merge rules: every split of every normal piece, ranked by the piece's score.
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, (score, pid) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, pid, cut, left, right))
    ranked.sort()
    return BPE(
        vocab={p.piece: i for i, p in enumerate(pieces)},
        merges=[(left, right) for *_, left, right in ranked],
        unk_token=pieces[trainer.unk_id].piece,
        fuse_unk=True,
        byte_fallback=trainer.byte_fallback,
        # user-defined pieces are isolated by the pre-tokenizer and must come out whole
        ignore_merges=has_user_defined,
    )


def _sp_to_tokenizers(proto: Any) -> Any:
    """Build a ``tokenizers.Tokenizer`` that segments like ``SentencePieceProcessor.encode``.

    Follows the model's own normalizer spec and piece types: the dummy prefix is prepended
    to every chunk of text between special tokens (as each ``sp.encode`` call does in
    ChatGLM3's ``build_single_message``), byte fallback, BPE merges ranked by piece score,
    user-defined pieces kept whole.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("SentencePiece models with treat_whitespace_as_suffix are not supported")
    pieces = list(proto.pieces)
    user_defined = [p.piece for p in pieces if p.type == _SP_USER_DEFINED]

    if trainer.model_type == 1:
        model = _unigram_model(pieces, trainer)
    elif trainer.model_type == 2:
        model = _bpe_model(pieces, trainer, has_user_defined=bool(user_defined))
    else:
        raise ValueError(
            f"unsupported SentencePiece model_type {trainer.model_type} (need BPE/Unigram)"
        )

    tok = Tokenizer(model)
    space = "▁" if norm.escape_whitespaces else " "
    steps: list[Any] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    if user_defined and trainer.model_type == 2:
        # SentencePiece's BPE matches user-defined pieces greedily (longest first) and never
        # merges them with their neighbours: isolate them before the model sees the text.
        alternatives = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(alternatives), behavior="isolated")
    dec: list[Any] = [decoders.Replace(space, " ")] if space != " " else []
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def load_chatglm_tokenizer(
    tokenizer_model: str | os.PathLike[str],
    *,
    model_max_length: int | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> PreTrainedTokenizerFast:
    """A fast tokenizer equivalent to ChatGLM3's, built from its SentencePiece ``tokenizer.model``.

    * ids ``0..n-1`` are the SentencePiece pieces and segment text like ``sp.encode``; the nine
      :data:`CHATGLM3_SPECIAL_TOKENS` follow at ``n..n+8`` (64789.. for the real model).
    * ``eos_token="</s>"`` (2), ``pad_token="<unk>"`` (0, as ChatGLM3), ``unk_token="<unk>"``,
      no bos; ``padding_side`` defaults to ChatGLM3's ``"left"`` and per-call
      ``padding_side=`` works.
    * ``add_special_tokens=True`` prefixes ``[gMASK] sop`` (pairs: ``[gMASK] sop A B </s>``),
      like ChatGLM3's ``build_inputs_with_special_tokens``. The chat template writes
      ``[gMASK]sop`` itself, so tokenize rendered chats with ``add_special_tokens=False``
      (``apply_chat_template(tokenize=True)`` does).
    * Special tokens written in text are recognised. ``sop``/``eop`` are plain words, so they
      only match as whole words (``single_word``): ``sophisticated`` is ordinary text, a
      stand-alone ``sop`` is not.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_model)
    proto = _read_sp_proto(path)
    tok = _sp_to_tokenizers(proto)
    n = len(proto.pieces)
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    for name in ("<unk>", "</s>"):
        if name not in pieces:
            raise ValueError(f"{path}: SentencePiece vocab has no {name!r} piece")
    # Control / unknown pieces that exist in the vocab (<unk>, <s>, </s>): special tokens.
    existing = [
        AddedToken(p.piece, special=True, normalized=False)
        for p in proto.pieces
        if p.type in (_SP_CONTROL, _SP_UNKNOWN)
    ]
    tok.add_special_tokens(existing)
    added = [
        AddedToken(t, special=True, normalized=False, single_word=t in ("sop", "eop"))
        for t in CHATGLM3_SPECIAL_TOKENS
    ]
    tok.add_special_tokens(added)
    for offset, t in enumerate(CHATGLM3_SPECIAL_TOKENS):
        if tok.token_to_id(t) != n + offset:
            raise ValueError(
                f"{t!r} got id {tok.token_to_id(t)}, expected {n + offset}: the SentencePiece "
                "vocab already contains a ChatGLM3 special token"
            )
    gmask, sop, eos = n + 1, n + 3, pieces["</s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A",
        pair="[gMASK] sop $A $B </s>",
        special_tokens=[("[gMASK]", gmask), ("sop", sop), ("</s>", eos)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="</s>",
        pad_token="<unk>",
        padding_side=padding_side,
        chat_template=CHATGLM3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
    )
    return hf


_CHATGLM3_ROLES = ("system", "user", "assistant", "observation")


def encode_chatglm3_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of a conversation built the way ChatGLM3's ``build_chat_input`` builds them.

    ``[gMASK] sop``, then per message the role token, ``"{metadata}\n"`` and the content,
    each encoded as plain text. Unlike tokenizing the rendered chat template, special-token
    strings inside message text (``<|user|>``, a stand-alone ``sop``) stay ordinary text.
    For ordinary content the ids equal ``apply_chat_template(messages, tokenize=True)``.
    """
    ids = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])
    for message in messages:
        role = "observation" if message["role"] == "tool" else message["role"]
        if role not in _CHATGLM3_ROLES:
            raise ValueError(f"ChatGLM3 has no role {message['role']!r}")
        content = message["content"]
        if role == "system" and message.get("tools"):
            content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids.append(tokenizer.convert_tokens_to_ids(f"<|{role}|>"))
        for text in (f"{message.get('metadata') or ''}\n", content):
            ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if add_generation_prompt:
        ids.append(tokenizer.convert_tokens_to_ids("<|assistant|>"))
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------

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
        m = _match_module(rel, to)
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
            scaling = _scaling(cfg, _CHATGLM_QKV.format(i=layer), a.shape[0])
            bs = _split_qkv_rows(fused[_LORA_B], dims)
            biases: Sequence[torch.Tensor | None] = (
                _split_qkv_rows(fused[_LORA_B_BIAS], dims)
                if _LORA_B_BIAS in fused
                else (None, None, None)
            )
            for p, b, bias in zip(_QKV_PARTS, bs, biases, strict=True):
                a_p, b_p = a, b
                if prune_zero_rank:
                    keep = (b != 0).any(dim=0)
                    if bool(keep.any()) and not bool(keep.all()):
                        a_p, b_p = a[keep], b[:, keep]
                mod = _GLM_QKV.format(i=layer, p=p)
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
                scaling = _scaling(cfg, _GLM_QKV.format(i=layer, p=p), a.shape[0])
                loras[p] = _Lora(a, tensors[_LORA_B], tensors.get(_LORA_B_BIAS), scaling)
            a_f, b_f, bias_f, scaling = _fuse_loras(loras, dims or _infer_mqa_dims(loras))
            mod = _CHATGLM_QKV.format(i=layer)
            out_sd[prefix + mod + _LORA_A] = a_f
            out_sd[prefix + mod + _LORA_B] = b_f
            if bias_f is not None:
                out_sd[prefix + mod + _LORA_B_BIAS] = bias_f
            ranks[mod] = (a_f.shape[0], _alpha_for(cfg, scaling, a_f.shape[0]))

    new_cfg = dict(cfg)
    targets = _translate_names(cfg.get("target_modules"), to)
    if targets is None:
        targets = _dedupe(mod.rpartition(".")[2] for mod in ranks)
    new_cfg["target_modules"] = targets
    if cfg.get("modules_to_save"):
        new_cfg["modules_to_save"] = _translate_names(cfg["modules_to_save"], to)
    if cfg.get("exclude_modules") and not isinstance(cfg["exclude_modules"], str):
        new_cfg["exclude_modules"] = _translate_names(cfg["exclude_modules"], to)
    new_cfg["rank_pattern"], new_cfg["alpha_pattern"] = _patterns(
        ranks, int(cfg.get("r", 8)), cfg.get("lora_alpha", 8)
    )
    return ConvertedAdapter(state_dict=_unshare(out_sd), target_modules=targets, config=new_cfg)


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

    present = [p for p in _QKV_PARTS if p in loras]
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
        blocks = [loras[p].b if p in loras else zeros_b(p, a_f.shape[0]) for p in _QKV_PARTS]
        b_f = _fuse_qkv_rows(blocks[0], blocks[1], blocks[2], dims)
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
        blocks = [full.get(p, zeros_b(p, total)) for p in _QKV_PARTS]
        b_f = _fuse_qkv_rows(blocks[0], blocks[1], blocks[2], dims)
    bias_f: torch.Tensor | None = None
    if any(loras[p].bias is not None for p in present):
        bias_parts: list[torch.Tensor] = []
        for p in _QKV_PARTS:
            bias = loras[p].bias if p in loras else None
            bias_parts.append(
                bias if bias is not None else torch.zeros(rows[p], dtype=dtype, device=device)
            )
        bias_f = _fuse_qkv_rows(bias_parts[0], bias_parts[1], bias_parts[2], dims)
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
        sd = _load_shard(src / "adapter_model.bin")
    mcfg: Mapping[str, Any] | None
    if model_config is None or isinstance(model_config, Mapping):
        mcfg = model_config
    else:
        mcfg = _read_config(Path(model_config))
        if mcfg is None:
            raise FileNotFoundError(f"no readable ChatGLM config at {model_config}")
    res = convert_adapter(sd, cfg, to=to, model_config=mcfg)
    new_cfg = res.config
    if base_model_name_or_path is not None:
        new_cfg["base_model_name_or_path"] = base_model_name_or_path
    with _AtomicDir(dst, overwrite=overwrite) as tmp:
        save_file(res.state_dict, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2, default=str) + "\n")
    return dst

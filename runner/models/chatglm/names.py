"""ChatGLM module names <-> native GLM module names, for weights, adapters and LoRA targets.

Every module maps one to one except attention: ChatGLM's fused ``query_key_value`` is GLM's
``q_proj``, ``k_proj`` and ``v_proj``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

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
CHATGLM_QKV = "transformer.encoder.layers.{i}.self_attention.query_key_value"
GLM_QKV = "model.layers.{i}.self_attn.{p}_proj"
QKV_PARTS = ("q", "k", "v")
INV_FREQ_KEY = "transformer.rotary_pos_emb.inv_freq"


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = (
        re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[qkv])")
    )
    # The module path must end at a component boundary.
    return re.compile(pattern + r"(?=\.|$)")


_C2G = [(_template_regex(c), g) for c, g in _MODULE_PAIRS]
_G2C = [(_template_regex(g), c) for c, g in _MODULE_PAIRS]
_CHATGLM_QKV_RE = _template_regex(CHATGLM_QKV)
_GLM_QKV_RE = _template_regex(GLM_QKV)


@dataclass(frozen=True)
class ModuleMatch:
    kind: Literal["plain", "qkv"]
    path: str  # translated module path ("" for qkv: depends on the part)
    layer: int
    suffix: str  # ".weight", ".lora_A.weight", ...
    part: str = ""  # q/k/v for GLM-side qkv keys


def match_module(key: str, to: Literal["glm", "chatglm"]) -> ModuleMatch | None:
    """Find which known module ``key`` (relative to the model root) belongs to."""
    table = _C2G if to == "glm" else _G2C
    qkv_re = _CHATGLM_QKV_RE if to == "glm" else _GLM_QKV_RE
    m = qkv_re.match(key)
    if m:
        return ModuleMatch(
            "qkv", "", int(m.group("i")), key[m.end() :], m.groupdict().get("p") or ""
        )
    for regex, template in table:
        m = regex.match(key)
        if m:
            layer = m.groupdict().get("i")
            path = template.format(i=layer) if layer is not None else template
            return ModuleMatch("plain", path, int(layer) if layer else -1, key[m.end() :])
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


def dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def translate_names(
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
    return dedupe(out)


def _translate_path(path: str, to: Literal["glm", "chatglm"]) -> list[str]:
    m = match_module(path, to)
    if m is None or m.suffix:
        raise ValueError(f"cannot translate module path {path!r} to {to} naming")
    if m.kind == "plain":
        return [m.path]
    if to == "glm":
        return [GLM_QKV.format(i=m.layer, p=p) for p in QKV_PARTS]
    return [CHATGLM_QKV.format(i=m.layer)]


def translate_target_modules(names: str | Iterable[str]) -> list[str]:
    """Translate ChatGLM LoRA target names to native GLM names.

    ``query_key_value`` becomes ``q_proj, k_proj, v_proj`` (see
    :data:`CHATGLM_TO_GLM_TARGETS`); names that are already GLM names pass through, dotted
    module paths are translated as paths, duplicates are dropped (order kept).
    ``"all-linear"`` passes through; other strings (peft regexes) raise ``ValueError``.
    """
    out = translate_names(names, "glm")
    return [out] if isinstance(out, str) else list(out or [])


def translate_target_modules_to_chatglm(names: str | Iterable[str]) -> list[str]:
    """The reverse of :func:`translate_target_modules` (``q_proj``/``k_proj``/``v_proj`` ->
    ``query_key_value`` and so on)."""
    out = translate_names(names, "chatglm")
    return [out] if isinstance(out, str) else list(out or [])

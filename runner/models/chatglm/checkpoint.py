"""A ChatGLM2/3 checkpoint folder -> a native GLM checkpoint folder (weights, config, tokenizer),
converted without importing or running the checkpoint's remote code."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.models.chatglm.config import ChatGLMDims, chatglm_config_to_glm
from runner.models.chatglm.files import AtomicDir, load_shard, read_config, unshare, weight_shards
from runner.models.chatglm.names import QKV_PARTS
from runner.models.chatglm.tokenizer import load_chatglm_tokenizer
from runner.models.chatglm.weights import convert_state_dict

if TYPE_CHECKING:
    import torch


def is_chatglm_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (a directory or its ``config.json``) is a ChatGLM checkpoint:
    ``model_type == "chatglm"`` or a ChatGLM architecture name."""
    cfg = read_config(Path(path))
    if cfg is None:
        return False
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") == "chatglm" or any(
        a in ("ChatGLMModel", "ChatGLMForConditionalGeneration") for a in archs
    )


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
    cfg, dims, tokenizer, stop_ids = _source_tokenizer(src)

    from transformers import GenerationConfig

    config = chatglm_config_to_glm(cfg, eos_token_ids=stop_ids)

    with AtomicDir(dst, overwrite=overwrite) as tmp:
        _write_weights(weight_shards(src), cfg, dims, tmp, max_shard_size)
        config.save_pretrained(tmp)
        GenerationConfig(eos_token_id=stop_ids, pad_token_id=config.pad_token_id).save_pretrained(
            tmp
        )
        _save_tokenizer(tokenizer, src, tmp)
    return dst


def convert_tokenizer(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """The tokenizer files of ``convert_checkpoint(src)`` alone (the same bytes), from
    ``config.json`` and ``tokenizer.model``: all that preparing data needs, without reading or
    converting the weights (which need not be there)."""
    src, dst = Path(src), Path(dst)
    _, _, tokenizer, _ = _source_tokenizer(src)
    with AtomicDir(dst, overwrite=overwrite) as tmp:
        _save_tokenizer(tokenizer, src, tmp)
    return dst


def _source_tokenizer(src: Path) -> tuple[dict[str, Any], ChatGLMDims, Any, list[int]]:
    """(config, dims, fast tokenizer, stop ids) of a ChatGLM checkpoint folder."""
    cfg = read_config(src)
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
    tokenizer = load_chatglm_tokenizer(sp_model, model_max_length=dims.seq_length)
    vocab = tokenizer.get_vocab()
    stop_ids = _dedupe_ints([tokenizer.eos_token_id, vocab["<|user|>"], vocab["<|observation|>"]])
    if max(stop_ids) >= dims.vocab_size or len(tokenizer) > dims.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {dims.vocab_size}"
        )
    return cfg, dims, tokenizer, stop_ids


def _save_tokenizer(tokenizer: Any, src: Path, out: Path) -> None:
    """The tokenizer files and the licence files that travel with them."""
    tokenizer.save_pretrained(out)
    _portable_tokenizer_class(out / "tokenizer_config.json")
    for lic in [*src.glob("*LICENSE*"), *src.glob("*License*")]:
        if lic.is_file():
            shutil.copy2(lic, out / lic.name)


def _portable_tokenizer_class(path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which every transformers the
    runner supports loads from the same tokenizer.json (why: docs/compatibility.md)."""
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
            for key, t in convert_state_dict(load_shard(shard), cfg).items():
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
        group = unshare(group)
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
        for part in QKV_PARTS:
            keys.add(p + f"self_attn.{part}_proj.weight")
            if dims.qkv_bias:
                keys.add(p + f"self_attn.{part}_proj.bias")
    return keys

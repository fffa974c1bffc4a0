"""Which base model a recipe names, and where its files are on disk.

`model_identity` and `tokenizer_identity` are cheap (no torch): they feed the fingerprints.
`materialize` does the work (build the tiny model, download, convert ChatGLM) and caches it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.recipe import BUILTIN_TINY, Recipe
from runner.state import fingerprint, sha256_file

TINY_BUILDER_VERSION = 1
CONVERTER_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_root() -> Path:
    return Path(os.environ.get("RECIPE_CACHE", "~/.cache/recipe")).expanduser()


def _tiny_settings(recipe: Recipe) -> dict[str, Any]:
    tiny = dict(recipe.get("model.tiny"))
    corpus = recipe.resolve(tiny.pop("corpus"))
    if not corpus.is_file():
        raise RecipeError(
            f"{recipe.path}: $.model.tiny.corpus: {corpus} not found; "
            "point it at a JSON-lines file with a `text` field"
        )
    tiny["corpus_sha256"] = sha256_file(corpus)
    return tiny


def _folder_files(folder: Path, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Small files by content hash; weight files by size and mtime (hashing 12 GB per plan is too slow)."""
    out: dict[str, Any] = {}
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        if names is not None and f.name not in names:
            continue
        if f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            out[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        else:
            out[f.name] = sha256_file(f)
    return out


def model_identity(recipe: Recipe) -> dict[str, Any]:
    m = recipe.section("model")
    name = m["name_or_path"]
    if name == BUILTIN_TINY:
        return {"kind": "builtin", "builder": TINY_BUILDER_VERSION, **_tiny_settings(recipe)}
    local = recipe.resolve(name)
    if local.is_dir():
        return {"kind": "local", "path": str(local), "files": _folder_files(local)}
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RecipeError(
            f"{recipe.path}: $.model.name_or_path: {name!r} is neither a local folder "
            "nor a hub id like owner/name; fix the path"
        )
    return {"kind": "hub", "id": name, "revision": m.get("revision") or "main"}


def tokenizer_identity(recipe: Recipe) -> dict[str, Any]:
    ident = model_identity(recipe)
    if ident["kind"] == "builtin":  # the tokenizer depends on these alone
        return {k: ident[k] for k in ("kind", "builder", "vocab_size", "corpus_sha256", "seed")}
    if ident["kind"] == "local":
        folder = Path(ident["path"])
        return {
            "kind": "local",
            "path": ident["path"],
            "files": _folder_files(folder, TOKENIZER_FILES),
        }
    return ident


def is_chatglm_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    return config.get("model_type") == "chatglm" or any("ChatGLM" in a for a in archs)


def materialize(recipe: Recipe, log: Callable[[str], None]) -> Path:
    """A local folder with a native-transformers checkpoint and tokenizer for the recipe's model."""
    ident = model_identity(recipe)
    if ident["kind"] == "builtin":
        return _build_tiny(recipe, ident, log)
    if ident["kind"] == "local":
        folder = Path(ident["path"])
    else:
        folder = _download(recipe, ident)
    if is_chatglm_folder(folder):
        return _convert_chatglm(folder, ident, log)
    return folder


def _build_tiny(recipe: Recipe, ident: dict[str, Any], log: Callable[[str], None]) -> Path:
    out = cache_root() / "models" / f"tiny-glm-{fingerprint(ident)}"
    if (out / "config.json").is_file():
        return out
    from runner.models.tiny import build_tiny_model

    tiny = dict(recipe.get("model.tiny"))
    log(f"building the embedded tiny model into {out} (once; cached)")
    facts = build_tiny_model(
        out,
        corpus=recipe.resolve(tiny["corpus"]),
        seed=tiny["seed"],
        vocab_size=tiny["vocab_size"],
        hidden_size=tiny["hidden_size"],
        num_layers=tiny["num_layers"],
        num_heads=tiny["num_heads"],
        num_kv_heads=tiny["num_kv_heads"],
        intermediate_size=tiny["intermediate_size"],
        pretrain_steps=tiny["pretrain_steps"],
        learning_rate=tiny["pretrain_learning_rate"],
        log=log,
    )
    log(f"tiny model built: {facts}")
    return out


def _download(recipe: Recipe, ident: dict[str, Any]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ident["id"], revision=ident["revision"]))
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise RecipeError(
            f"{recipe.path}: $.model.name_or_path: cannot fetch {ident['id']!r} "
            f"(revision {ident['revision']}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "without network, download it elsewhere and set name_or_path to the local folder"
        ) from None


def _convert_chatglm(folder: Path, ident: dict[str, Any], log: Callable[[str], None]) -> Path:
    out = cache_root() / "converted" / f"glm-{fingerprint({'src': ident, 'v': CONVERTER_VERSION})}"
    if (out / "config.json").is_file():
        return out
    from runner.models.chatglm import convert_checkpoint

    log(f"converting ChatGLM checkpoint {folder} to native GLM in {out} (once; cached)")
    convert_checkpoint(folder, out)
    return out

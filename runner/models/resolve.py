"""Which base model a recipe names, and where its files are on disk.

`model_identity` and `tokenizer_identity` are cheap (no torch): they feed the fingerprints.
`materialize` does the work (build the tiny model, download, convert ChatGLM) and caches it.
`tokenizer_folder` does only what preparing data needs (the tokenizer files: no weights, no
pre-training, no weight conversion), so format, tokenize and `recipe inspect` run on a laptop
for any model; quantize-load is the first stage that needs the weights.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.data.sources import data_identity, dataset_identity
from runner.data.templates import template_identity
from runner.errors import RecipeError
from runner.recipe import BUILTIN_TINY, TINY_CORPUS_TRAIN, Recipe, flatten
from runner.recipe.confine import check_code_unchanged
from runner.recipe.mix import has_sources
from runner.state import cache_build_lock, cache_root, fingerprint, sha256_file

TINY_BUILDER_VERSION = 1
CONVERTER_VERSION = 2  # 2: the source's config kept in recipe_source.json
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
# What a tokenizer-only hub download fetches (huggingface_hub allow_patterns): every file a
# tokenizer of TOKENIZER_FILES / TOKENIZER_VOCAB may be made of, a SentencePiece model under any
# name, the chat template, and config.json (a ChatGLM checkpoint is told by it).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "config.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SOURCE_FILE = "recipe_source.json"  # in a converted folder: what it was converted from


# The keys that decide the formatted training texts: what the format stage reads (runner/plan.py)
# but the template's format, which turns texts into tokens.
TEXT_KEYS = ("recipe.seed", "dataset", "template")
# where the data and template files are: their contents stand in for them
PLACE_KEYS = ("dataset.path", "template.prompt_file", "template.response_file")


def training_texts_identity(recipe: Recipe) -> dict[str, Any]:
    """What decides the recipe's formatted training texts, cheaply (no formatting): the format
    stage's settings and the content hashes of its data and template files. It keys the tiny
    model built on them (corpus = "train"), so other data builds another model; by content
    alone, not where the files are, so a `recipe new` starter (a copy of a shipped demo set)
    shares the shipped recipe's model."""
    params = {
        k: v
        for k, v in flatten(recipe.data).items()
        if any(k == r or k.startswith(r + ".") for r in TEXT_KEYS)
        and k not in (*PLACE_KEYS, "template.format")
    }
    if has_sources(recipe):  # a mix: each source's files and templates, as format keys them
        return {"params": params, **data_identity(recipe)}
    data = dataset_identity(recipe)
    if "files" in data:  # keyed by the path inside the data set (which file is which split)
        names = list(data["files"])
        top = posixpath.dirname(names[0]) if len(names) == 1 else posixpath.commonpath(names)
        data = {"files": {posixpath.relpath(n, top or "."): h for n, h in data["files"].items()}}
    template_identity(recipe)  # a missing template file: its one-line error
    section = recipe.section("template")
    templates = {
        part: sha256_file(recipe.resolve(section[f"{part}_file"]))
        for part in ("prompt", "response")
        if f"{part}_file" in section
    }
    return {"params": params, "dataset": data, "templates": templates}


def _tiny_settings(recipe: Recipe) -> dict[str, Any]:
    tiny = dict(recipe.get("model.tiny"))
    named = tiny.pop("corpus")
    if named == TINY_CORPUS_TRAIN:
        tiny["corpus_source"] = training_texts_identity(recipe)
        return tiny
    corpus = recipe.resolve(named)
    if not corpus.is_file():
        raise RecipeError(
            f"{recipe.origin('model.tiny.corpus')}: $.model.tiny.corpus: {corpus} not found; "
            "point it at a JSON-lines file with a `text` field (or "
            f'corpus = "{TINY_CORPUS_TRAIN}": the recipe\'s own training texts)'
        )
    tiny["corpus_sha256"] = sha256_file(corpus)
    return tiny


@dataclass(frozen=True)
class TinyTexts:
    """What the tiny model learns from: its tokenizer's texts and its pre-training's."""

    tokenizer: list[str]
    pretrain: list[str]


def tiny_texts(recipe: Recipe) -> TinyTexts:
    """The corpus file's texts for both, or with corpus = "train" the recipe's formatted training
    rows (never the held-out ones): the tokenizer learns every prompt and response, the
    pre-training the responses alone, as adgen-tiny's corpus is ad copy without prompts. So the
    base speaks the data's language but has not seen the prompt -> response mapping, which
    fine-tuning teaches (and the before/after table shows)."""
    from runner.models.tiny import read_corpus

    named = recipe.get("model.tiny.corpus")
    if named != TINY_CORPUS_TRAIN:
        texts = read_corpus(recipe.resolve(named))
        return TinyTexts(texts, texts)
    from runner.data.formatting import prepare

    train = prepare(recipe).train
    responses = list(dict.fromkeys(t for t in train["response"] if t.strip()))
    if not responses:
        raise RecipeError(
            f"{recipe.origin('model.tiny.corpus')}: $.model.tiny.corpus: "
            f'"{TINY_CORPUS_TRAIN}": the training split has no response text to build the tiny '
            "model on; add rows, or point corpus at a JSON-lines file with a `text` field"
        )
    prompts = [t for t in dict.fromkeys(train["prompt"]) if t.strip()]
    return TinyTexts(tokenizer=[*prompts, *responses], pretrain=responses)


def _folder_files(
    folder: Path, names: tuple[str, ...] | None = None, recipe: Recipe | None = None
) -> dict[str, Any]:
    """Small files by content hash; weight files by size and mtime.

    Hashing 12 GB of weights per plan is too slow. With `recipe`, every file is re-checked
    against what the recipe may read: a link in the folder may lead out of it.
    """
    out: dict[str, Any] = {}
    found = sorted(p for p in folder.iterdir() if p.is_file() or p.is_symlink())
    if recipe is not None:
        recipe.check_found("model.name_or_path", found)
    for f in (p for p in found if p.is_file()):
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
    if local.is_dir():  # identified by its files, not by where it is
        return {"kind": "local", "files": _folder_files(local, recipe=recipe)}
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RecipeError(
            f"{recipe.origin('model.name_or_path')}: $.model.name_or_path: "
            f"{name!r} is neither a local folder "
            "nor a hub id like owner/name; fix the path"
        )
    return {"kind": "hub", "id": name, "revision": m.get("revision") or "main"}


def weights_identity(recipe: Recipe) -> dict[str, Any]:
    """model_identity without the tokenizer files: what loading the model reads (a changed
    tokenizer re-runs tokenize, not quantize-load)."""
    ident = model_identity(recipe)
    if ident["kind"] == "local":
        files = {k: v for k, v in ident["files"].items() if k not in TOKENIZER_FILES}
        return {**ident, "files": files}
    return ident


def tokenizer_identity(recipe: Recipe) -> dict[str, Any]:
    ident = model_identity(recipe)
    if ident["kind"] == "builtin":  # the tokenizer depends on these alone
        keys = ("kind", "builder", "vocab_size", "corpus_sha256", "corpus_source", "seed")
        return {k: ident[k] for k in keys if k in ident}
    if ident["kind"] == "local":
        folder = recipe.resolve(recipe.get("model.name_or_path"))
        return {"kind": "local", "files": _folder_files(folder, TOKENIZER_FILES)}
    return ident


def is_chatglm_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    archs = config.get("architectures") or []
    return config.get("model_type") == "chatglm" or any("ChatGLM" in a for a in archs)


# AutoTokenizer needs one of these (the rest of TOKENIZER_FILES only configure it)
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def config_problem(config_file: Path) -> str | None:
    """Why a model's config.json cannot be used, or None (also when there is none)."""
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"not valid JSON (line {e.lineno}, column {e.colno})"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if not isinstance(raw, dict):
        return f"holds a JSON {type(raw).__name__}, not an object"
    if not isinstance(raw.get("model_type"), str):
        return "has no model_type"
    return None


def check_model_folder(recipe: Recipe, folder: Path) -> None:
    """One line naming the file and the fix for a corrupt config.json, which transformers
    reports with a traceback (or which makes a ChatGLM checkpoint look like another model)."""
    problem = config_problem(folder / "config.json")
    if problem:
        raise RecipeError(
            f"{recipe.origin('model.name_or_path')}: $.model.name_or_path: "
            f"{folder / 'config.json'}: {problem}; restore the model's original config.json "
            "(copy or download it again)"
        )


def tokenizer_problem(folder: Path) -> str | None:
    if not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_VOCAB):
        return None
    return (
        f"{folder}: no tokenizer files ({', '.join(TOKENIZER_VOCAB)}); copy the model's "
        "tokenizer into the folder (tokenizer.save_pretrained(folder))"
    )


def materialize(recipe: Recipe, log: Callable[[str], None]) -> Path:
    """A local folder with a native-transformers checkpoint and tokenizer for the recipe's model."""
    ident = model_identity(recipe)
    if ident["kind"] == "builtin":
        return _build_tiny(recipe, ident, log)
    if ident["kind"] == "local":
        folder = recipe.resolve(recipe.get("model.name_or_path"))
        # the code may have changed since the recipe was loaded; transformers imports it next
        check_code_unchanged(recipe.data, folder, str(recipe.origin("model.name_or_path")))
    else:
        folder = _download(recipe, ident)
    check_model_folder(recipe, folder)
    if recipe.get("model.random_init"):
        return _random_weights(folder, ident, log)
    if is_chatglm_folder(folder):
        return _convert_chatglm(folder, ident, log)
    return folder


def tokenizer_folder(recipe: Recipe, log: Callable[[str], None]) -> Path:
    """A local folder with the tokenizer of the recipe's model, the same files `materialize`'s
    folder has, fetched or built alone: the tiny model's tokenizer without the model, a hub
    model's tokenizer files without its weights, a ChatGLM checkpoint's tokenizer converted
    without its weights. A folder `materialize` already made is used as it is."""
    ident = model_identity(recipe)
    if ident["kind"] == "builtin":
        built = builtin_folder(ident)
        if (built / "config.json").is_file():
            return built
        return _tiny_tokenizer(recipe, log)
    if ident["kind"] == "local":
        folder = recipe.resolve(recipe.get("model.name_or_path"))
    else:
        folder = _download(recipe, ident, TOKENIZER_PATTERNS)
    check_model_folder(recipe, folder)
    if recipe.get("model.random_init"):  # materialize copies the folder's tokenizer files
        return folder
    if is_chatglm_folder(folder):
        converted = converted_folder(ident)
        if (converted / "config.json").is_file():
            return converted
        return _convert_chatglm_tokenizer(folder, log)
    return folder


def tiny_tokenizer_folder(recipe: Recipe) -> Path:
    """Where the tiny model's tokenizer alone is cached: keyed by what determines it."""
    return cache_root() / "tokenizers" / f"tiny-glm-{fingerprint(tokenizer_identity(recipe))}"


def _tiny_tokenizer(
    recipe: Recipe, log: Callable[[str], None], texts: TinyTexts | None = None
) -> Path:
    out = tiny_tokenizer_folder(recipe)
    if (out / "tokenizer.json").is_file():
        return out
    with cache_build_lock(out, log):
        if (out / "tokenizer.json").is_file():
            return out
        return _tiny_tokenizer_locked(recipe, out, log, texts)


def _tiny_tokenizer_locked(
    recipe: Recipe, out: Path, log: Callable[[str], None], texts: TinyTexts | None
) -> Path:
    from runner.models.tiny import build_tiny_tokenizer

    log(f"building the embedded tiny model's tokenizer into {out} (once; cached)")
    facts = build_tiny_tokenizer(
        out,
        texts=(tiny_texts(recipe) if texts is None else texts).tokenizer,
        vocab_size=recipe.get("model.tiny.vocab_size"),
    )
    log(f"tiny tokenizer built: {facts}")
    return out


def _convert_chatglm_tokenizer(folder: Path, log: Callable[[str], None]) -> Path:
    """ChatGLM3's tokenizer as the conversion writes it, keyed by the files it is made of."""
    src = {"kind": "tokenizer", "files": _folder_files(folder, (*TOKENIZER_FILES, "config.json"))}
    key = fingerprint({"src": src, "v": CONVERTER_VERSION})
    out = cache_root() / "converted" / f"glm-tokenizer-{key}"
    if (out / "tokenizer.json").is_file():
        return out
    from runner.models.chatglm.checkpoint import convert_tokenizer

    log(f"converting the ChatGLM tokenizer of {folder} into {out} (once; cached)")
    try:
        convert_tokenizer(folder, out, overwrite=True)
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"{folder}: cannot convert this ChatGLM tokenizer: {type(e).__name__}: {e}"
        ) from None
    return out


def builtin_folder(ident: dict[str, Any]) -> Path:
    """Where the embedded tiny model of these settings is (or will be) cached."""
    return cache_root() / "models" / f"tiny-glm-{fingerprint(ident)}"


def _build_tiny(recipe: Recipe, ident: dict[str, Any], log: Callable[[str], None]) -> Path:
    out = builtin_folder(ident)
    if (out / "config.json").is_file():
        return out
    with cache_build_lock(out, log):
        if (out / "config.json").is_file():  # built by the process this one waited for
            return out
        return _build_tiny_locked(recipe, out, log)


def _build_tiny_locked(recipe: Recipe, out: Path, log: Callable[[str], None]) -> Path:
    from runner.models.tiny import build_tiny_model

    texts = tiny_texts(recipe)
    tokenizer = _tiny_tokenizer(recipe, log, texts)  # the tokenizer tokenize used: same ids
    tiny = dict(recipe.get("model.tiny"))
    log(f"building the embedded tiny model into {out} (once; cached)")
    facts = build_tiny_model(
        out,
        tokenizer_dir=tokenizer,
        texts=texts.pretrain,
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


def _download(
    recipe: Recipe, ident: dict[str, Any], patterns: tuple[str, ...] | None = None
) -> Path:
    """The hub snapshot at the pinned revision: every file, or those matching `patterns`."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                ident["id"],
                revision=ident["revision"],
                allow_patterns=list(patterns) if patterns else None,
            )
        )
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise RecipeError(
            f"{recipe.path}: $.model.name_or_path: cannot fetch {ident['id']!r} "
            f"(revision {ident['revision']}): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}; "
            "without network, download it elsewhere and set name_or_path to the local folder"
        ) from None


def converted_folder(ident: dict[str, Any]) -> Path:
    """Where the native GLM conversion of a ChatGLM checkpoint is cached: keyed by the source's
    identity (hub id + revision, or the local folder's files) and the converter's version."""
    return cache_root() / "converted" / f"glm-{fingerprint({'src': ident, 'v': CONVERTER_VERSION})}"


def chatglm_source_config(folder: Path) -> dict[str, Any] | None:
    """The original ChatGLM config.json when `folder` was converted from a ChatGLM checkpoint."""
    try:
        data = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = data.get("chatglm_config") if isinstance(data, dict) else None
    return config if isinstance(config, dict) else None


def _convert_chatglm(folder: Path, ident: dict[str, Any], log: Callable[[str], None]) -> Path:
    out = converted_folder(ident)
    if (out / "config.json").is_file():
        return out
    from runner.models.chatglm.checkpoint import convert_checkpoint
    from runner.state import fresh_tmp_dir, replace_dir

    log(f"converting ChatGLM checkpoint {folder} to native GLM in {out} (once; cached)")
    tmp = fresh_tmp_dir(out)
    try:
        convert_checkpoint(folder, tmp)
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"{folder}: cannot convert this ChatGLM checkpoint to native GLM: "
            f"{type(e).__name__}: {e}"
        ) from None
    source = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (tmp / SOURCE_FILE).write_text(
        json.dumps({"format": "chatglm", "source": ident, "chatglm_config": source}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    replace_dir(tmp, out)
    return out


def remote_code_note(recipe: Recipe) -> str | None:
    """With trust_remote_code on: which of the model's Python files would run. A local folder's
    *.py files; for a hub id the ones the hub lists at the pinned revision (one quick request),
    or a line saying the hub could not be asked. None when remote code is off."""
    m = recipe.section("model")
    if not m.get("trust_remote_code"):
        return None
    name = m["name_or_path"]
    local = recipe.resolve(name)
    if name == BUILTIN_TINY:
        return "remote code: none (the builtin model is native transformers code)"
    if local.is_dir():
        files = sorted(p.name for p in local.glob("*.py"))
        where = str(local)
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return (
            f"remote code: cannot list the *.py files of {name} at revision "
            f"{m.get('revision')} (offline: HF_HUB_OFFLINE is set)"
        )
    else:
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(name, revision=m.get("revision"), timeout=5)
        except Exception as e:  # offline, unknown repo, auth: one line
            return (
                f"remote code: cannot list the *.py files of {name} at revision "
                f"{m.get('revision')} (hub unreachable or refused: {type(e).__name__})"
            )
        files = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".py"))
        where = f"{name}@{m.get('revision')}"
    chatglm = is_chatglm_folder(local) if local.is_dir() else "modeling_chatglm.py" in files
    if chatglm:
        return (
            f"remote code: not run: {where} is a ChatGLM checkpoint, converted to native GLM "
            f"instead (its {', '.join(files) or 'no'} .py files are ignored)"
        )
    if not files:
        return f"remote code: trust_remote_code = true, but {where} ships no .py files"
    return f"remote code that would run (trust_remote_code = true): {where}: {', '.join(files)}"


def _random_weights(folder: Path, ident: dict[str, Any], log: Callable[[str], None]) -> Path:
    """The model of `folder`'s config.json with seeded random weights.

    The weights are generated on the GPU when there is one.
    """
    out = cache_root() / "random" / f"random-{fingerprint({'src': ident, 'v': 1})}"
    if (out / "config.json").is_file():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from runner.state import fresh_tmp_dir, replace_dir

    log(f"building {folder.name} with random weights into {out} (once; cached)")
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = fresh_tmp_dir(out)
    model.save_pretrained(tmp)
    del model
    for f in folder.iterdir():
        if f.is_file() and f.name in TOKENIZER_FILES:
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, out)
    return out

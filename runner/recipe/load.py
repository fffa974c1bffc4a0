"""TOML in, a validated Recipe out: parse, apply --set overrides, check schema and cross-field rules."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.recipe.model import BUILTIN_TINY, Recipe
from runner.recipe.schema import json_path, schema_errors, subschema, with_defaults
from runner.recipe.toml_lines import key_lines, line_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file; check the path") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None) or _line_from_message(str(e))
        msg = str(e).split(" (at line")[0]
        raise RecipeError(f"{path}:{line or 1}: invalid TOML: {msg}") from None


def _line_from_message(message: str) -> int | None:
    marker = "(at line "
    if marker in message:
        return int(message.split(marker, 1)[1].split(",")[0].rstrip(")"))
    return None


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """`lora.r=16` -> (("lora", "r"), 16), typed by the schema where it can be."""
    if "=" not in item:
        raise RecipeError(f"--set {item}: expected KEY=VALUE, e.g. --set lora.r=16")
    key, raw = item.split("=", 1)
    path = tuple(part.strip() for part in key.strip().split("."))
    if not all(path):
        raise RecipeError(f"--set {item}: empty key part; write it as table.key=value")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as adamw_torch
    sub = subschema(path)
    types = sub.get("type") if sub else None
    if isinstance(types, str):
        types = [types]
    if types and "string" in types and not isinstance(value, str):
        value = raw
    return path, value


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {'.'.join(path)}: {part} is not a table")
        node = child
    node[path[-1]] = value


def cross_field_errors(written: dict[str, Any], data: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Rules a JSON Schema cannot say clearly. `written` is the recipe without defaults."""
    errors: list[tuple[tuple[str, ...], str]] = []
    q_written = written.get("quantization", {})
    q = data["quantization"]
    if q["load_in_4bit"] and q["load_in_8bit"]:
        errors.append((("quantization", "load_in_8bit"),
                       "load_in_8bit and load_in_4bit are both true; set one of them to false"))
    if not q["load_in_4bit"]:
        for key in sorted(k for k in q_written if k.startswith("bnb_4bit_")):
            errors.append((("quantization", key),
                           f"{key} is set but load_in_4bit is false; remove it or set load_in_4bit = true"))
    train = data["train"]
    if train["bf16"] is True and train["fp16"]:
        errors.append((("train", "fp16"), "fp16 and bf16 are both true; choose one"))
    if train["fp16"] and q["load_in_4bit"] and q["bnb_4bit_compute_dtype"] == "bfloat16":
        errors.append((("train", "fp16"),
                       "fp16 = true with bnb_4bit_compute_dtype = \"bfloat16\" mixes dtypes; "
                       "use bf16 = true (or compute dtype float16 on GPUs without bf16)"))
    model = data["model"]
    if model["trust_remote_code"] and not model.get("revision"):
        errors.append((("model", "trust_remote_code"),
                       "trust_remote_code = true needs a pinned model.revision (a commit hash), "
                       "so the code that runs cannot change under you"))
    if "tiny" in written.get("model", {}) and model["name_or_path"] != BUILTIN_TINY:
        errors.append((("model", "tiny"),
                       f"[model.tiny] only applies to name_or_path = \"{BUILTIN_TINY}\"; remove it"))
    template = written.get("template", {})
    for part in ("prompt", "response"):
        given = [k for k in (part, f"{part}_file") if k in template]
        if len(given) != 1:
            what = "both" if given else "neither"
            errors.append((("template", part),
                           f"{what} of {part} and {part}_file given; set exactly one"))
    ds = data["dataset"]
    if data["compare"]["num_examples"] > 0 and ds["heldout_split"] is None and ds["heldout_rows"] == 0:
        errors.append((("compare", "num_examples"),
                       "compare needs held-out rows: set dataset.heldout_rows > 0 or dataset.heldout_split, "
                       "or compare.num_examples = 0"))
    return errors


def load_recipe(path: Path | str, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, override, validate. Raises RecipeError with one line per problem."""
    shown = Path(path)  # as the user wrote it, for messages
    path = shown.expanduser().resolve()
    data, text = read_toml(shown)
    lines = key_lines(text)
    written = copy.deepcopy(data)
    from_set: dict[tuple[str, ...], str] = {}
    for item in overrides:
        key, value = parse_override(item)
        _set(written, key, value)
        from_set[key] = item

    def place(p: tuple[str | int, ...]) -> str:
        strs = tuple(str(x) for x in p)
        for i in range(len(strs), 0, -1):
            if strs[:i] in from_set:
                return f"--set {from_set[strs[:i]]}"
        return f"{shown}:{line_of(lines, strs) or 1}"

    def by_line(found: Sequence[tuple[tuple[str | int, ...], str]]) -> list[str]:
        def order(item: tuple[tuple[str | int, ...], str]) -> tuple[int, str]:
            return line_of(lines, tuple(str(x) for x in item[0])) or 0, json_path(item[0])

        return [f"{place(p)}: {json_path(p)}: {m}" for p, m in sorted(found, key=order)]

    errors = by_line(schema_errors(written))
    if errors:
        raise RecipeError(errors)
    full = with_defaults(written)
    errors = by_line(cross_field_errors(written, full))
    if errors:
        raise RecipeError(errors)
    return Recipe(path=path, data=full, written=written, overrides=tuple(overrides))

"""JSON Schema validation of a recipe: every error at once, each on one line with its place."""

from __future__ import annotations

import difflib
import functools
import json
import math
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

# schemas/ at the top of the checkout; runner/schemas links to it, so a built wheel (which copies
# the link's target) carries the schema inside the package.
SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "recipe.schema.json"


@functools.cache
def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


@functools.cache
def quiet_defaults() -> dict[str, Any]:
    """{dotted key: default} of the keys marked `x-omit-default`: keys added after runs existed,
    left out of the stage fingerprints while they hold their default, so that adding them
    leaves every existing run done (runner/plan.py)."""
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if sub.get("x-omit-default") and "default" in sub:
                out[prefix + key] = sub["default"]
            walk(sub, f"{prefix}{key}.")

    walk(load_schema(), "")
    return out


def json_path(path: tuple[str | int, ...]) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def subschema(path: tuple[str | int, ...]) -> dict[str, Any] | None:
    """The schema of the key at `path` (an int: a table of an array of tables), or None when the
    schema does not know it."""
    node: dict[str, Any] = load_schema()
    for part in path:
        if isinstance(part, int):
            if "items" not in node:
                return None
            node = node["items"]
            continue
        props = node.get("properties")
        if not props or part not in props:
            return None
        node = props[part]
    return node


def _unknown_key_messages(error: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    schema: Any = error.schema
    instance: Any = error.instance
    allowed = sorted(schema.get("properties", {}))
    extra = sorted(set(instance) - set(allowed))
    found = []
    for key in extra:
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
        found.append(((*error.absolute_path, key), f"unknown key '{key}'; {hint}"))
    return found


def _message(error: ValidationError) -> str:
    if error.validator == "anyOf" and error.context:
        # The branch whose type the value has says what is wrong with it (0 for "integer >= 1
        # or 'auto'" is below the minimum, not "not 'auto'").
        context: Any = error.context
        mistyped = {e.schema_path[0] for e in context if e.validator == "type"}
        typed = [e for e in context if e.schema_path[0] not in mistyped]
        not_type = [e for e in context if e.validator != "type"]
        best = best_match(typed or not_type or context)
        branches: Any = error.validator_value
        options = " or ".join(
            str(s.get("type") if "enum" not in s else " | ".join(map(repr, s["enum"])))
            for s in branches
        )
        return f"{_message(best)} (expected {options})"
    if error.validator == "type" and isinstance(error.instance, bool):
        # TOML booleans are lowercase; Python's "True is not of type 'integer'" reads as a typo
        wanted: Any = error.validator_value
        types = [wanted] if isinstance(wanted, str) else list(wanted)
        if not {"integer", "number"} & set(types):
            return f"{str(error.instance).lower()} is a boolean, not {' or '.join(types)}"
        return (
            f"{str(error.instance).lower()} is a boolean, not {' or '.join(types)}; "
            f"write a number{_example(tuple(error.absolute_path))}"
        )
    if error.validator == "exclusiveMinimum" and tuple(error.absolute_path)[-1:] == ("weight",):
        return (
            f"{error.instance} is not a share of the mix; give a number above 0 (weights are "
            "relative: 3 and 1 make 75% and 25%), or remove the source"
        )
    if error.validator == "enum":
        allowed: Any = error.validator_value
        return f"{error.instance!r} is not one of {', '.join(map(repr, allowed))}"
    return error.message


# torch, numpy and the Trainer keep counts and seeds in 64-bit integers; TOML and --set parse
# any size, and a bigger one fails deep inside a stage with OverflowError.
INT64_MAX = 2**63 - 1


def _example(path: tuple[str | int, ...]) -> str:
    keys = tuple(p for p in path if isinstance(p, str))
    sub = subschema(keys) if len(keys) == len(path) else None
    default = sub.get("default") if sub is not None else None
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return f", e.g. the default {default}"
    return ""


Found = list[tuple[tuple[str | int, ...], str]]


def number_errors(value: Any, path: tuple[str | int, ...] = ()) -> Found:
    """NaN, infinities and integers beyond 64 bits, anywhere in the recipe. JSON Schema cannot
    say "finite": nan compares false with every bound, so `learning_rate = nan` passes
    `exclusiveMinimum: 0` and fails at train instead."""
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in number_errors(v, (*path, k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in number_errors(v, (*path, i))]
    if isinstance(value, float) and not math.isfinite(value):
        return [
            (
                path,
                f"{value} is not a finite number (NaN and infinity are refused); "
                f"write a number{_example(path)}",
            )
        ]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return [
            (
                path,
                f"{value} does not fit in 64 bits; write a smaller number{_example(path)}",
            )
        ]
    return []


def schema_errors(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) for every schema violation, sorted by path."""
    validator = Draft202012Validator(load_schema())
    found = number_errors(data)
    # one message per key: the schema's own complaint about a NaN ("nan is not of type
    # 'string'") says less than ours
    bad_numbers = {path for path, _ in found}
    for error in validator.iter_errors(data):
        if tuple(error.absolute_path) in bad_numbers:
            continue
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            found.extend(_unknown_key_messages(error))
        else:
            found.append((tuple(error.absolute_path), _message(error)))
    return sorted(found, key=lambda item: [str(p) for p in item[0]])


def with_defaults(data: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `data` with every schema default filled in (tables too)."""
    schema = schema or load_schema()
    out = dict(data)
    required = schema.get("required", []) + schema.get("else", {}).get("required", [])
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            if key in out or key not in required:
                out[key] = with_defaults(out.get(key, {}), sub)
        elif key not in out and "default" in sub:
            out[key] = sub["default"]
    return out

"""JSON Schema validation of a recipe: every error at once, each on one line with its place."""

from __future__ import annotations

import difflib
import functools
import json
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


def json_path(path: tuple[str | int, ...]) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def subschema(path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema of the key at `path`, or None when the schema does not know it."""
    node: dict[str, Any] = load_schema()
    for part in path:
        props = node.get("properties")
        if not props or part not in props:
            return None
        node = props[part]
    return node


def _unknown_key_messages(error: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    allowed = sorted(error.schema.get("properties", {}))
    extra = sorted(set(error.instance) - set(allowed))
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
        mistyped = {e.schema_path[0] for e in error.context if e.validator == "type"}
        typed = [e for e in error.context if e.schema_path[0] not in mistyped]
        not_type = [e for e in error.context if e.validator != "type"]
        best = best_match(typed or not_type or error.context)
        options = " or ".join(
            str(s.get("type") if "enum" not in s else " | ".join(map(repr, s["enum"])))
            for s in error.validator_value
        )
        return f"{_message(best)} (expected {options})"
    if error.validator == "enum":
        return f"{error.instance!r} is not one of {', '.join(map(repr, error.validator_value))}"
    return error.message


def schema_errors(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) for every schema violation, sorted by path."""
    validator = Draft202012Validator(load_schema())
    found: list[tuple[tuple[str | int, ...], str]] = []
    for error in validator.iter_errors(data):
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

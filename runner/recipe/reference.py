"""docs/recipe-reference.md, generated from the schema: every key, its type, default and
description, and what each allowed value means. `recipe reference --output FILE` writes it;
tests/test_reference.py fails when the checked-in page is out of date. Imports no torch."""

from __future__ import annotations

import json
from typing import Any

from runner.recipe.schema import load_schema

PAGE = "docs/recipe-reference.md"
INTRO = """\
# Recipe reference

<!-- Generated from schemas/recipe.schema.json by `recipe reference --output {page}`
     (`just docs`). Do not edit by hand: tests/test_reference.py fails when it is out of date. -->

{description}

Paths are relative to the file that sets them. Keys marked **required** must be set in the
recipe or in a file it `extends`. A key left out takes its default; *unset* means the feature is
off or left to the library. `recipe show RECIPE` prints a recipe with every default filled in.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _literal(value: Any) -> str:
    if value is None:
        return "*unset*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _enum(values: list[Any]) -> str:
    return " | ".join(_literal(v) for v in values)


def _type(node: dict[str, Any], limits: bool = True) -> str:
    if "anyOf" in node:
        return " or ".join(_type(branch, limits) for branch in node["anyOf"])
    if "enum" in node:
        return _enum(node["enum"])
    types = node.get("type", "any")
    names = [t for t in ([types] if isinstance(types, str) else types) if t != "null"]
    out = []
    for name in names:
        if name == "array":
            items = node.get("items", {})
            inner = "table" if items.get("type") == "object" else _type(items, limits=False)
            out.append(f"array of {inner}")
        elif name == "object":
            values = node.get("additionalProperties")
            out.append(f"table of {_type(values, False)}" if isinstance(values, dict) else "table")
        else:
            out.append(name)
    text = " or ".join(out)
    if not limits:
        return text
    found = []
    if "minimum" in node:
        found.append(f">= {node['minimum']}")
    if "exclusiveMinimum" in node:
        found.append(f"> {node['exclusiveMinimum']}")
    if "maximum" in node:
        found.append(f"<= {node['maximum']}")
    if "multipleOf" in node:
        found.append(f"multiple of {node['multipleOf']}")
    if node.get("minLength") == 1 or node.get("minItems") == 1:
        found.append("not empty")
    if node.get("uniqueItems"):
        found.append("no repeats")
    if "pattern" in node:
        found.append(f"matches `{node['pattern']}`")
    return f"{text} ({', '.join(found)})" if found else text


def _value_docs(node: dict[str, Any]) -> list[str]:
    """`value`: what it means, for every enum under `node` that documents its values."""
    out = []
    for branch in [node, *node.get("anyOf", [])]:
        docs = branch.get("x-taplo", {}).get("docs", {}).get("enumValues") or []
        for value, doc in zip(branch.get("enum", []), docs, strict=False):
            out.append(f"{_literal(value)}: {doc}")
    return out


def _required(schema: dict[str, Any]) -> set[str]:
    """Dotted keys a complete recipe must set (the schema's `else`: files that do not extend)."""
    cond = schema.get("else", {})
    found = {key for key in [*schema.get("required", []), *cond.get("required", [])]}
    for table, sub in cond.get("properties", {}).items():
        found |= {f"{table}.{key}" for key in sub.get("required", [])}
    return found


def _table(rows: list[tuple[str, dict[str, Any]]], required: set[str]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for dotted, node in rows:
        key = dotted.rsplit(".", 1)[-1]
        kind = _type(node) + (", **required**" if dotted in required else "")
        default = (
            _literal(node["default"])
            if "default" in node
            else ("" if dotted in required else "*unset*")
        )
        values = _value_docs(node)
        text = node.get("description", "") + (" Values: " + " ".join(values) if values else "")
        lines.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(text)} |")
    return lines


def render_reference(schema: dict[str, Any] | None = None) -> str:
    schema = schema or load_schema()
    required = _required(schema)
    out = [INTRO.format(page=PAGE, description=schema.get("description", ""))]
    top = [(k, node) for k, node in schema["properties"].items() if node.get("type") != "object"]
    if top:
        out += ["## Top-level keys", "", *_table(top, required), ""]

    def section(dotted: str, node: dict[str, Any]) -> None:
        flag = " (**required**)" if dotted in required else ""
        out.extend([f"## `[{dotted}]`{flag}", "", node.get("description", ""), ""])
        props = node.get("properties", {})
        leaves = [
            (f"{dotted}.{k}", v)
            for k, v in props.items()
            if not (v.get("type") == "object" and "properties" in v)
        ]
        if leaves:
            out.extend([*_table(leaves, required), ""])
        for k, v in props.items():
            if v.get("type") == "object" and "properties" in v:
                section(f"{dotted}.{k}", v)
        for k, v in props.items():  # an array of tables: its tables' keys ([[dataset.sources]])
            items = v.get("items", {})
            if v.get("type") == "array" and "properties" in items:
                out.extend([f"## `[[{dotted}.{k}]]`", "", v.get("description", ""), ""])
                rows = [(f"{dotted}.{k}[].{key}", sub) for key, sub in items["properties"].items()]
                needed = {f"{dotted}.{k}[].{key}" for key in items.get("required", [])}
                out.extend([*_table(rows, needed), ""])

    for key, node in schema["properties"].items():
        if node.get("type") == "object":
            section(key, node)
    return "\n".join(out).rstrip("\n") + "\n"

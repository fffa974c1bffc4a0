"""[[dataset.sources]]: several data sets in one recipe, each seen as a one-source recipe.

`source_recipes` turns each source into a Recipe whose [dataset] and [template] are the source's
own keys over the recipe's (a key a source leaves unset comes from [dataset] / [template]), so
everything that reads one data set (loading, confinement, templates, identities, exports) reads a
source unchanged. `rekeyed` makes its errors name the source's key
(`$.dataset.sources[1].path`) instead of the one-source key. Imports no torch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from runner.errors import RecipeError
from runner.recipe.model import Recipe

# [dataset] keys a source may set for itself (the rest, e.g. shuffle and max_rows, are shared)
DATASET_KEYS = (
    "path",
    "name",
    "revision",
    "split",
    "heldout_split",
    "heldout_rows",
    "columns",
    "flatten",
    "format",
    "messages",
    "sharegpt",
    "alpaca",
)
TEMPLATE_KEYS = ("prompt", "response", "prompt_file", "response_file")
FIELD_TABLES = ("messages", "sharegpt", "alpaca")  # merged key by key over [dataset]'s


@dataclass(frozen=True)
class Source:
    index: int
    recipe: Recipe  # the recipe as if this source were its only data set
    written: dict[str, Any]  # the source's table as written
    weight: float | None
    rows: int | None

    @property
    def key(self) -> str:
        return f"dataset.sources[{self.index}]"

    @property
    def label(self) -> str:
        """How metrics, status and compare name the source: its path as written."""
        return str(self.written["path"])


def has_sources(recipe: Recipe) -> bool:
    return bool(recipe.section("dataset").get("sources"))


def source_section(
    dataset: dict[str, Any], template: dict[str, Any], source: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """([dataset], [template]) of one source: its keys over the recipe's."""
    section = {k: v for k, v in dataset.items() if k not in ("sources", "path")}
    for key in DATASET_KEYS:
        if key not in source:
            continue
        if key in FIELD_TABLES:
            section[key] = {**(dataset.get(key) or {}), **source[key]}
        else:
            section[key] = source[key]
    section["max_rows"] = None  # the mix is capped as a whole
    tmpl = dict(template)
    for part in ("prompt", "response"):
        given = [k for k in (part, f"{part}_file") if k in source]
        if given:
            tmpl.pop(part, None)
            tmpl.pop(f"{part}_file", None)
            tmpl[given[0]] = source[given[0]]
    if section.get("format", "template") != "template":
        for key in TEMPLATE_KEYS:  # a conversation renders no templates
            tmpl.pop(key, None)
    return section, tmpl


def source_recipes(recipe: Recipe) -> list[Source]:
    """Each [[dataset.sources]] table as a one-source recipe; [] without sources."""
    out = []
    where = recipe.origin("dataset.sources")
    for i, src in enumerate(recipe.section("dataset").get("sources") or []):
        section, tmpl = source_section(recipe.section("dataset"), recipe.section("template"), src)
        origins = dict(recipe.origins)
        for key in src:
            table = "template" if key in TEMPLATE_KEYS else "dataset"
            if where != recipe.path:
                origins[f"{table}.{key}"] = where
        data = {**recipe.data, "dataset": section, "template": tmpl}
        sub = replace(recipe, data=data, origins=origins)
        out.append(Source(i, sub, dict(src), src.get("weight"), src.get("rows")))
    return out


def rekey(message: str, source: Source) -> str:
    """`$.dataset.split` -> `$.dataset.sources[1].split` for keys the source set itself (an
    inherited key keeps its [dataset] / [template] name); `$.dataset.path` always."""

    def sub(m: re.Match[str]) -> str:
        table, key = m.group(1), m.group(2)
        if key in source.written or (table == "dataset" and key == "path"):
            return f"$.{source.key}.{key}"
        return f"{m.group(0)} (as {source.key} inherits it)"

    message = re.sub(r"\$\.(dataset|template)\.([a-z_]+)", sub, message, count=1)

    def own(m: re.Match[str]) -> str:  # a template the source wrote, as the renderer names it
        return f"{source.key}.{m.group(1)}" if m.group(1) in source.written else m.group(0)

    return re.sub(r"(?<![\w$.])template\.(prompt|response)\b", own, message)


@contextlib.contextmanager
def rekeyed(source: Source) -> Iterator[None]:
    """Errors raised while reading one source name that source's keys."""
    try:
        yield
    except RecipeError as e:
        lines = [rekey(line, source) for line in e.lines]
        lines = [  # a line naming no key and not the source's data: say which source
            line
            if source.key in line or source.label in line
            else f"{source.key} ({source.label}): {line}"
            for line in lines
        ]
        raise RecipeError(lines) from None

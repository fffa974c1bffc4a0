"""A recipe file read as TOML: one problem naming the file (and line) when it cannot be.

A leaf of runner.recipe: load.py and layers.py (each `extends` parent) both read files here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from runner.recipe.problems import InvalidRecipe, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    def fail(message: str, line: int | None = None) -> InvalidRecipe:
        return InvalidRecipe([Problem(str(path), line, None, message)])

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail("no such recipe file; check the path") from None
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise fail(f"cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None) or _line_from_message(str(e))
        msg = str(e).split(" (at line")[0]
        raise fail(f"invalid TOML: {msg}", line or 1) from None


def _line_from_message(message: str) -> int | None:
    marker = "(at line "
    if marker in message:
        return int(message.split(marker, 1)[1].split(",")[0].rstrip(")"))
    return None

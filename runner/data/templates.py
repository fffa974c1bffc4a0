"""Prompt and response templates: Jinja in a sandbox, strict about undefined variables.

Shared recipes are untrusted input: the sandbox denies dunder attributes, the environment has no
loader (no file reads, no includes) and no globals beyond Jinja's safe builtins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.recipe import Recipe
from runner.state import sha256_file


@dataclass(frozen=True)
class TemplateText:
    name: str  # "template.prompt" or the file path, for messages
    source: str


def template_sources(recipe: Recipe) -> dict[str, TemplateText]:
    """{"prompt": ..., "response": ...} read from the recipe or its template files."""
    section = recipe.section("template")
    out: dict[str, TemplateText] = {}
    for part in ("prompt", "response"):
        if part in section:
            out[part] = TemplateText(f"template.{part}", section[part])
            continue
        path = recipe.resolve(section[f"{part}_file"])
        try:
            out[part] = TemplateText(str(path), path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"{recipe.path}: $.template.{part}_file: {path} not found; "
                              "check the path (relative to the recipe file)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{recipe.path}: $.template.{part}_file: cannot read {path}: {e}") from None
    return out


def template_identity(recipe: Recipe) -> dict[str, str]:
    """Content hashes of template files (inline templates are already recipe params)."""
    section = recipe.section("template")
    out = {}
    for part in ("prompt", "response"):
        key = f"{part}_file"
        if key in section:
            path = recipe.resolve(section[key])
            if not path.is_file():
                raise RecipeError(f"{recipe.path}: $.template.{key}: {path} not found; "
                                  "check the path (relative to the recipe file)")
            out[str(path)] = sha256_file(path)
    return out


class Renderer:
    """Compiled prompt/response templates; `render(row, index)` -> (prompt, response)."""

    def __init__(self, sources: dict[str, TemplateText]) -> None:
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False,
                                            autoescape=False)
        self.sources = sources
        self.templates: dict[str, Any] = {}
        for part, text in sources.items():
            try:
                self.templates[part] = env.from_string(text.source)
            except TemplateSyntaxError as e:
                raise RecipeError(f"{text.name}:{e.lineno}: template syntax error: {e.message}") from None

    def render_part(self, part: str, row: dict[str, Any], index: int) -> str:
        from jinja2 import UndefinedError
        from jinja2.exceptions import SecurityError

        try:
            return str(self.templates[part].render(**row))
        except UndefinedError as e:
            raise RecipeError(
                f"{self.sources[part].name}: row {index}: {e.message}; "
                f"the row has columns: {', '.join(sorted(row))} (rename with [dataset.columns])"
            ) from None
        except SecurityError as e:
            raise RecipeError(f"{self.sources[part].name}: row {index}: not allowed in a template: {e}") from None

    def render(self, row: dict[str, Any], index: int) -> tuple[str, str]:
        return self.render_part("prompt", row, index), self.render_part("response", row, index)

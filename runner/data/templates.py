"""Prompt and response templates: Jinja in a sandbox, strict about undefined variables.

Shared recipes are untrusted input: the sandbox denies dunder attributes, the environment has no
loader (no file reads, no includes) and no globals beyond Jinja's safe builtins.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        where = recipe.origin(f"template.{part}_file")
        try:
            out[part] = TemplateText(str(path), path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(
                f"{where}: $.template.{part}_file: {path} not found; "
                "check the path (relative to the file that sets it)"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{where}: $.template.{part}_file: cannot read {path}: {e}") from None
    return out


def template_identity(recipe: Recipe) -> dict[str, str]:
    """Content hashes of template files (inline templates are already recipe params), keyed by
    their path relative to the recipe file."""
    section = recipe.section("template")
    out = {}
    for part in ("prompt", "response"):
        key = f"{part}_file"
        if key in section:
            path = recipe.resolve(section[key])
            if not path.is_file():
                raise RecipeError(
                    f"{recipe.origin('template.' + key)}: $.template.{key}: "
                    f"{path} not found; check the path "
                    "(relative to the file that sets it)"
                )
            out[recipe.portable(section[key], path)] = sha256_file(path)
    return out


class Renderer:
    """Compiled prompt/response templates; `render(row, index)` -> (prompt, response).

    Errors name the template, the row (`where` and `index`, e.g. "train row 18") and, for an
    undefined variable, the columns the row does have."""

    def __init__(self, sources: dict[str, TemplateText]) -> None:
        from jinja2 import BaseLoader, StrictUndefined, TemplateSyntaxError
        from jinja2.exceptions import SecurityError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class NoFiles(BaseLoader):  # include / import / extends: refused, never a file read
            def get_source(self, environment: Any, template: str) -> Any:
                raise SecurityError(f"templates cannot read files ({template!r})")

        env = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined,
            keep_trailing_newline=False,
            autoescape=False,
            loader=NoFiles(),
        )
        self.sources = sources
        self.templates: dict[str, Any] = {}
        for part, text in sources.items():
            try:
                self.templates[part] = env.from_string(text.source)
            except TemplateSyntaxError as e:
                raise RecipeError(
                    f"{text.name}:{e.lineno}: template syntax error: {e.message}"
                ) from None

    def render_part(self, part: str, row: dict[str, Any], index: int, where: str = "row") -> str:
        from jinja2 import UndefinedError
        from jinja2.exceptions import SecurityError

        name = self.sources[part].name
        try:
            return str(self.templates[part].render(**row))
        except SecurityError as e:  # before UndefinedError: unsafe attributes are undefined too
            raise RecipeError(f"{name}: {where} {index}: not allowed in a template: {e}") from None
        except UndefinedError as e:
            hint = ""
            if str(e.message).endswith("is undefined"):
                hint = (
                    f"; the row has columns: {', '.join(sorted(row))} "
                    "(rename with [dataset.columns])"
                )
            raise RecipeError(f"{name}: {where} {index}: {e.message}{hint}") from None
        except Exception as e:  # a filter or operator failed on this row's values
            first = str(e).splitlines()[0] if str(e) else ""
            raise RecipeError(f"{name}: {where} {index}: {type(e).__name__}: {first}") from None

    def render(self, row: dict[str, Any], index: int, where: str = "row") -> tuple[str, str]:
        return (
            self.render_part("prompt", row, index, where),
            self.render_part("response", row, index, where),
        )

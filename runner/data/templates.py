"""Prompt and response templates: Jinja in a sandbox, strict about undefined variables.

Shared recipes are untrusted input: the sandbox denies dunder attributes, the environment has no
loader (no file reads, no includes) and no globals beyond Jinja's safe builtins. Rendering is
bounded per row (loop iterations, output size, `*` and `**` results), so a template cannot hang
or exhaust memory.

Data values are text: a `{{ }}` that would print null, a boolean, a list or a dict (Python's repr,
never what the data meant) is refused as a `DataValueError` naming the column; numbers print as
numbers (`{{ price }}` of 12 is "12").

Newlines are kept as written, with one exception. The prompt keeps its final newline (a file
ending in `### Response:` and a newline puts the response on the next line, as the file shows;
Jinja's default would drop it and glue the two). The response template drops one final newline,
as Jinja does by default: the end token follows the response, and a newline an editor added at
the end of a file would otherwise be trained before it.
"""

from __future__ import annotations

import re
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
        if f"{part}_file" not in section:  # a conversation format has no templates
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


_FINAL_NEWLINE = re.compile(r"(\r\n|\r|\n)\Z")  # the newline Jinja's default drops


def prompt_keeps_newline(recipe: Recipe) -> bool:
    """Whether the prompt template ends with a newline: it renders since the runner kept final
    newlines (it used to be dropped), so the format stage's fingerprint says so."""
    prompt = template_sources(recipe).get("prompt")  # conversations have no prompt template
    return prompt is not None and bool(_FINAL_NEWLINE.search(prompt.source))


MAX_ITERATIONS = 100_000  # loop iterations per rendered part of one row
MAX_CHARS = 4_000_000  # characters per rendered part of one row (and per value built on the way)
MAX_POWER_BITS = 4_096  # the largest integer `**` may build


class DataValueError(RecipeError):
    """A row value a template prints is not text or a number (null, bool, list, dict)."""

    def __init__(self, column: str | None, kind: str, shown: str, message: str = "") -> None:
        self.column, self.kind, self.shown = column, kind, shown
        super().__init__(message or f"column {column!r}: {kind}")

    def describe(self, source: str, where: str, index: int, drop_hint: bool = True) -> str:
        what = f"column {self.column!r}" if self.column else "a printed value"
        if self.kind == "null":
            fix = "write text (or a number) there"
        elif self.kind == "a list":
            fix = f'join it in the template ({{{{ {self.column or "x"} | join(", ") }}}})'
        elif self.kind == "a dict":
            fix = f"print its fields in the template ({{{{ {self.column or 'x'}.name }}}})"
        else:
            fix = "write text there (quote it)"
        also = ', or set dataset.bad_rows = "drop" to skip such rows' if drop_hint else ""
        shown = "" if self.kind == "null" else f" ({self.shown})"
        return f"{source}: {where} {index}: {what} is {self.kind}{shown}, not text; {fix}{also}"


class TemplateLimitError(RecipeError):
    pass


def _kind(value: Any) -> str | None:
    """What a printed value is when it is not text or a number; None when it prints fine."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (str, int, float)):
        return None
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, (list, tuple)):
        return "a list"
    return None  # Jinja's own objects (loop, namespace, markup) print as the template wants


def _shown(value: Any) -> str:
    import json

    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


class _Budget:
    """What one render may still spend; reset before each part of each row."""

    def __init__(self) -> None:
        self.iterations = 0
        self.chars = 0

    def reset(self) -> None:
        self.iterations = 0
        self.chars = 0


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


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

        budget = self.budget = _Budget()
        self.row: dict[str, Any] = {}

        def spend_chars(n: int) -> None:
            if n > MAX_CHARS:
                raise TemplateLimitError(f"a value of more than {MAX_CHARS:,} characters")

        def bounded(iterable: Any) -> Any:
            # every {% for %} iterates through here (see `parse` below)
            for item in iterable:
                budget.iterations += 1
                if budget.iterations > MAX_ITERATIONS:
                    raise TemplateLimitError(f"more than {MAX_ITERATIONS:,} loop iterations")
                yield item

        def sized(value: Any) -> Any:
            spend_chars(_size(value))
            return value

        def finalize(value: Any) -> Any:
            kind = _kind(value)
            if kind:
                column = next(
                    (k for k, v in self.row.items() if v is value),
                    next((k for k, v in self.row.items() if v == value), None),
                )
                raise DataValueError(column, kind, _shown(value))
            budget.chars += len(str(value)) if isinstance(value, str) else 24
            if budget.chars > MAX_CHARS:
                raise TemplateLimitError(f"more than {MAX_CHARS:,} characters of output")
            return value

        class Bounded(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(["*", "**", "+"])

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                if (
                    operator == "**"
                    and isinstance(left, int)
                    and isinstance(right, int)
                    and right > 0
                    and abs(left) > 1
                    and right * abs(left).bit_length() > MAX_POWER_BITS
                ):
                    raise TemplateLimitError(f"a power of more than {MAX_POWER_BITS:,} bits")
                if operator == "*":
                    for seq, n in ((left, right), (right, left)):
                        if isinstance(n, int) and not isinstance(n, bool):
                            spend_chars(_size(seq) * n)
                if operator == "+":
                    spend_chars(_size(left) + _size(right))
                return super().call_binop(context, operator, left, right)

            def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
                from jinja2 import nodes

                tree = super()._parse(source, name, filename)
                for loop in tree.find_all(nodes.For):
                    loop.iter = nodes.Filter(loop.iter, "_bounded", [], [], None, None)
                for concat in list(tree.find_all(nodes.Concat)):
                    concat.nodes = [
                        nodes.Filter(n, "_sized", [], [], None, None) for n in concat.nodes
                    ]
                return tree

        env = Bounded(
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
            loader=NoFiles(),
            finalize=finalize,
        )
        env.filters["_bounded"] = bounded
        env.filters["_sized"] = sized
        for filter_name, function in list(env.filters.items()):
            if filter_name not in ("_bounded", "_sized"):
                env.filters[filter_name] = _size_checked(function, spend_chars)
        self.sources = sources
        self.templates: dict[str, Any] = {}
        self.names: dict[str, set[str]] = {}
        for part, text in sources.items():
            try:
                source = _FINAL_NEWLINE.sub("", text.source) if part == "response" else text.source
                self.templates[part] = env.from_string(source)
            except TemplateSyntaxError as e:
                raise RecipeError(
                    f"{text.name}:{e.lineno}: template syntax error: {e.message}"
                ) from None

    def render_part(
        self,
        part: str,
        row: dict[str, Any],
        index: int,
        where: str = "row",
        source: str | None = None,
        drop_hint: bool = True,
    ) -> str:
        from jinja2 import UndefinedError
        from jinja2.exceptions import SecurityError

        name = self.sources[part].name
        self.budget.reset()
        self.row = row
        try:
            return str(self.templates[part].render(**row))
        except DataValueError as e:
            text = e.describe(source or name, where, index, drop_hint)
            raise DataValueError(e.column, e.kind, e.shown, text) from None
        except TemplateLimitError as e:
            raise TemplateLimitError(
                f"{name}: {where} {index}: the template built {e}; bound its loops and output "
                "(loop over the row's values, not over huge ranges)"
            ) from None
        except RecursionError:
            raise TemplateLimitError(
                f"{name}: {where} {index}: the template recursed too deeply; bound its recursion"
            ) from None
        except MemoryError:
            raise TemplateLimitError(
                f"{name}: {where} {index}: the template ran out of memory; bound its output"
            ) from None
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

    def render(
        self, row: dict[str, Any], index: int, where: str = "row", source: str | None = None
    ) -> tuple[str, str]:
        return (
            self.render_part("prompt", row, index, where, source),
            self.render_part("response", row, index, where, source),
        )


def _size_checked(function: Any, spend_chars: Any) -> Any:
    """A filter whose result counts against the size bound (`center(10**9)`, `indent`)."""
    import functools

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        if isinstance(result, (str, list)):
            spend_chars(len(result))
        return result

    return checked

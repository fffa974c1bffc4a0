"""One problem in a recipe, as a line of text (FILE:LINE: $.key: message) or as JSON for CI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.errors import RecipeError


@dataclass(frozen=True)
class Problem:
    file: str  # the file the bad value is in, as the user named it
    line: int | None
    path: str | None  # JSON path of the key, e.g. $.lora.r
    message: str
    set_item: str | None = None  # the --set KEY=VALUE the value came from, if any

    def text(self) -> str:
        if self.set_item is not None:
            where = f"--set {self.set_item}"
        else:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_json(self) -> dict[str, Any]:
        message = self.message
        if self.set_item is not None:
            message += f" (from --set {self.set_item})"
        return {"file": self.file, "line": self.line, "path": self.path, "message": message}


class InvalidRecipe(RecipeError):
    """A RecipeError that also knows each problem's file, line and key."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__([p.text() for p in self.problems])

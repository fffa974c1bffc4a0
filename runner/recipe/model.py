"""The validated recipe: its data with defaults, where it came from, and path helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_TINY = "builtin:tiny-glm"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


@dataclass(frozen=True)
class Recipe:
    path: Path  # the recipe file, absolute
    data: dict[str, Any]  # validated, with defaults
    written: dict[str, Any]  # as written (after overrides), without defaults
    overrides: tuple[str, ...] = field(default=())

    def get(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    def section(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] = self.data.get(name, {})
        return value

    @property
    def name(self) -> str:
        return str(self.data["recipe"]["name"])

    @property
    def seed(self) -> int:
        return int(self.data["recipe"]["seed"])

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        """A path written in the recipe, relative to the recipe file."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def run_dir(self) -> Path:
        out = self.data["recipe"].get("output_dir")
        if out is None:
            return (Path.cwd() / "runs" / self.name).resolve()
        p = Path(out).expanduser()
        return p if p.is_absolute() else (Path.cwd() / p).resolve()

    @property
    def is_builtin_model(self) -> bool:
        return bool(self.data["model"]["name_or_path"] == BUILTIN_TINY)

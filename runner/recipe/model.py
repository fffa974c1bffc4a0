"""The validated recipe: its data with defaults, where it came from, and path helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.recipe.confine import Confinement

BUILTIN_TINY = "builtin:tiny-glm"
# model.tiny.corpus naming no file: the recipe's own formatted training texts (a file named
# "train" is written "./train")
TINY_CORPUS_TRAIN = "train"


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
    overrides: tuple[str, ...] = field(default=())  # --set KEY=VALUE items
    unsets: tuple[str, ...] = field(default=())  # --unset KEY items (applied before overrides)
    origins: dict[str, Path] = field(default_factory=dict)  # dotted key -> parent file that set it
    files: tuple[Path, ...] = field(default=())  # the recipe and every file it extends
    confinement: Confinement | None = None  # where it may read (None: built by hand, in tests)

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
        """A path written in the recipe, relative to the recipe file (paths its parents wrote
        were rebased onto the recipe file's folder when they were merged)."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def check_found(self, dotted: str, files: list[Path]) -> None:
        """Files found by a glob or in a folder the key names are still inside what the recipe
        may read (a link among them may lead out); RecipeError otherwise."""
        if self.confinement is not None:
            where = str(self.origin(dotted))
            self.confinement.check_found(where, dotted, files, str(self.get(dotted)))

    @property
    def allowed(self) -> tuple[str, ...]:
        """The folders the person running allowed, to pass on to a worker process."""
        return self.confinement.given if self.confinement is not None else ()

    def origin(self, dotted: str) -> Path:
        """The file that set a key: a file the recipe extends, else the recipe itself."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:i]))
            if found is not None:
                return found
        return self.path

    def portable(self, written: str, path: Path) -> str:
        """How a file that the value `written` names appears in fingerprints and lock files:
        relative to the recipe file (two clones agree), absolute only when written absolute."""
        if Path(written).expanduser().is_absolute():
            return path.as_posix()
        try:
            return Path(os.path.relpath(path, self.base_dir)).as_posix()
        except ValueError:  # another drive (Windows)
            return path.as_posix()

    def to_toml(self) -> str:
        """The fully resolved recipe (defaults, parents and overrides applied) as TOML."""
        import tomli_w

        header = [f"# {self.path} resolved (defaults and overrides applied)"]
        if len(self.files) > 1:
            header.append(f"# extends: {', '.join(str(f) for f in self.files[1:])}")
        if self.unsets:
            header.append("# --unset " + " --unset ".join(self.unsets).replace("\n", "\\n"))
        if self.overrides:
            header.append("# --set " + " --set ".join(self.overrides).replace("\n", "\\n"))
        data = _drop_none(self.data)
        if not self.is_builtin_model:  # its defaults only apply to the built-in model, and a
            data["model"].pop("tiny", None)  # hub or local model refuses the table on reload
        return "\n".join(header) + "\n" + tomli_w.dumps(data)

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


def _drop_none(data: Any) -> Any:
    """TOML has no null: a key whose value is None is left out (it reads back as its default)."""
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return data

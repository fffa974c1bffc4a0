"""`extends`: a recipe built on other recipe files.

The parents are read first (depth first, in the order `extends` lists them) and merged: tables
merge key by key, the later file wins, lists and values are replaced whole. Each leaf keeps its
origin (file and line) so a bad value is reported where it was written. Paths a parent writes
(`PATH_KEYS`) are relative to the parent; after the merge they are rewritten relative to the
recipe file itself, so everything downstream resolves paths against one folder and fingerprints
stay free of absolute paths. Imports no torch.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.recipe.model import BUILTIN_TINY, TINY_CORPUS_TRAIN
from runner.recipe.problems import InvalidRecipe, Problem
from runner.recipe.toml_lines import key_lines
from runner.recipe.tomlfile import read_toml

if TYPE_CHECKING:
    from runner.recipe.confine import Confinement

Key = tuple[str, ...]

# Recipe keys whose values are file system paths (when they are not hub ids).
PATH_KEYS: tuple[Key, ...] = (
    ("model", "name_or_path"),
    ("model", "tiny", "corpus"),
    ("dataset", "path"),
    ("template", "prompt_file"),
    ("template", "response_file"),
)
# Setting one key of a pair in a file drops the other inherited from its parents.
EXCLUSIVE: dict[Key, Key] = {
    ("template", "prompt"): ("template", "prompt_file"),
    ("template", "prompt_file"): ("template", "prompt"),
    ("template", "response"): ("template", "response_file"),
    ("template", "response_file"): ("template", "response"),
}


@dataclass(frozen=True)
class Origin:
    path: Path  # the file, absolute
    shown: str  # the file as the user would name it (relative to how the recipe was given)
    line: int
    rank: int  # 0 for the recipe itself, then parents in the order they were read


@dataclass
class Merged:
    data: dict[str, Any]  # without `extends`; path values relative to the recipe file
    origins: dict[Key, Origin]  # every key path a file wrote (tables too) -> where
    files: list[Path]  # every file read, the recipe first


def lookup(origins: dict[Key, Origin], path: tuple[str | int, ...]) -> Origin | None:
    """The origin of the longest prefix of `path` that some file wrote."""
    keys = tuple(str(p) for p in path)
    for i in range(len(keys), 0, -1):
        if keys[:i] in origins:
            return origins[keys[:i]]
    return None


def load_layers(shown: Path, confinement: Confinement | None = None) -> Merged:
    """Read `shown` and every file it extends, merged; paths rebased onto `shown`'s folder.
    With a confinement, a parent file outside it is refused (a parent may not climb out)."""
    files: list[Path] = []
    merged = _load(shown, (), files, confinement)
    root = shown.expanduser().resolve()
    for key in PATH_KEYS:
        origin = merged.origins.get(key)
        value = _get(merged.data, key)
        if origin is None or origin.path == root or not isinstance(value, str):
            continue
        if is_local_path(key, value, origin.path.parent):
            _put(merged.data, key, rebase(value, origin.path.parent, root.parent))
    merged.files = files
    return merged


def is_local_path(key: Key, value: str, base: Path) -> bool:
    """A value names a local file or folder if it starts with . / ~, exists relative to the file
    that wrote it, is a glob, or is not shaped like a hub id (owner/name)."""
    if key == ("model", "name_or_path") and value == BUILTIN_TINY:
        return False
    if key == ("model", "tiny", "corpus") and value == TINY_CORPUS_TRAIN:
        return False  # the recipe's training texts, not a file
    if value.startswith((".", "/", "~")) or any(ch in value for ch in "*?["):
        return True
    if (base / value).exists():
        return True
    return not (value.count("/") == 1 and not Path(value).suffix)


def rebase(value: str, written_in: Path, recipe_dir: Path) -> str:
    """`value`, relative to `written_in`, as a path relative to `recipe_dir` (absolute stays)."""
    if Path(value).expanduser().is_absolute():
        return value
    target = os.path.normpath(written_in / value)
    try:
        rel = Path(os.path.relpath(target, recipe_dir)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(target).as_posix()
    return rel if rel.startswith(".") else f"./{rel}"


def _get(data: dict[str, Any], key: Key) -> Any:
    node: Any = data
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _put(data: dict[str, Any], key: Key, value: Any) -> None:
    node = data
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value


def _drop(data: dict[str, Any], origins: dict[Key, Origin], key: Key) -> None:
    parent = _get(data, key[:-1])
    if isinstance(parent, dict):
        parent.pop(key[-1], None)
    for k in [k for k in origins if k[: len(key)] == key]:
        del origins[k]


def _parents(
    data: dict[str, Any], shown: Path, path: Path, line: int, confinement: Confinement | None
) -> list[tuple[Path, int]]:
    """The files `extends` names, as shown to the user, with the line it is on."""
    raw = data.pop("extends", None)
    if raw is None:
        return []
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidRecipe(
            [
                Problem(
                    str(shown),
                    line,
                    "$.extends",
                    f"{raw!r} is not a file name or a list of file names; "
                    'write extends = "base.toml" or extends = ["a.toml", "b.toml"]',
                )
            ]
        )
    out = []
    for name in names:
        given = Path(name).expanduser()
        problem = confinement.read_problem(name, path.parent / given) if confinement else None
        if problem:
            raise InvalidRecipe([Problem(str(shown), line, "$.extends", problem)])
        parent_shown = given if given.is_absolute() else Path(os.path.normpath(shown.parent / name))
        if not (path.parent / given).is_file():
            raise InvalidRecipe(
                [
                    Problem(
                        str(shown),
                        line,
                        "$.extends",
                        f"{name!r} not found (looked for {parent_shown}); "
                        f"the path is relative to {shown}",
                    )
                ]
            )
        out.append((parent_shown, line))
    return out


def _load(
    shown: Path,
    chain: tuple[tuple[Path, str], ...],
    files: list[Path],
    confinement: Confinement | None,
) -> Merged:
    path = shown.expanduser().resolve()
    data, text = read_toml(shown)
    lines = key_lines(text)
    files.append(path)
    rank = len(files) - 1
    merged = Merged({}, {}, [])
    extends_line = lines.get(("extends",), 1)
    for parent, line in _parents(data, shown, path, extends_line, confinement):
        parent_path = parent.expanduser().resolve()
        seen = [p for p, _ in chain] + [path]
        if parent_path in seen:
            names = [s for _, s in chain] + [str(shown), str(parent)]
            raise InvalidRecipe(
                [
                    Problem(
                        str(shown),
                        line,
                        "$.extends",
                        f"cycle: {' -> '.join(names)}; remove one of these extends",
                    )
                ]
            )
        layer = _load(parent, (*chain, (path, str(shown))), files, confinement)
        merged = _merge(merged, layer.data, layer.origins)
    own = {
        key: Origin(path, str(shown), number, rank)
        for key, number in lines.items()
        if key != ("extends",) and _get(data, key) is not None
    }
    return _merge(merged, data, own)


def _merge(base: Merged, over: dict[str, Any], over_origins: dict[Key, Origin]) -> Merged:
    data = copy.deepcopy(base.data)
    origins = dict(base.origins)
    for key, other in EXCLUSIVE.items():
        if _get(over, key) is not None and _get(over, other) is None:
            _drop(data, origins, other)
    name = _get(over, ("model", "name_or_path"))
    if name is not None and name != BUILTIN_TINY and _get(over, ("model", "tiny")) is None:
        _drop(data, origins, ("model", "tiny"))  # the tiny model's settings go with it

    def walk(dst: dict[str, Any], src: dict[str, Any], prefix: Key) -> None:
        for k, v in src.items():
            here = (*prefix, k)
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                walk(dst[k], v, here)
            else:
                if k in dst:
                    _drop(data, origins, here)  # replaced whole: forget what was under it
                dst[k] = copy.deepcopy(v)

    walk(data, over, ())
    origins.update(over_origins)
    return Merged(data, origins, base.files)

"""Where a recipe may read and write, and which model code it may run.

Recipes are shared, so the person running one often did not write it. A recipe may name files
inside its root (the git work tree holding the top recipe file, or that file's folder when there
is none); anything else needs the person running to allow it (`--allow-path DIR`, or
RECIPE_ALLOW_PATHS), never a recipe key. Special files (/proc, /dev, /sys, FIFOs, sockets,
devices) are refused even when allowed: reading them leaks secrets or never ends.
Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RecipeError

ENV = "RECIPE_ALLOW_PATHS"
SPECIAL_TREES = (Path("/proc"), Path("/dev"), Path("/sys"))
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def recipe_root(recipe_file: Path) -> Path:
    """The git work tree that holds `recipe_file`, else its folder (no git call: a `.git` file
    or folder marks a work tree, worktrees and submodules included)."""
    folder = recipe_file.expanduser().resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return candidate
    return folder


def _inside(path: Path, area: Path) -> bool:
    return path == area or area in path.parents


def special_file(real: Path) -> str | None:
    """What makes `real` a path no recipe may read (under /proc, /dev or /sys, or neither a
    regular file nor a folder), or None."""
    for tree in SPECIAL_TREES:
        if _inside(real, tree):
            return f"a special file (under {tree})"
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return None  # missing: the reader says "not found"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"a special file ({kind}: {real})"


@dataclass(frozen=True)
class Confinement:
    root: Path  # resolved
    allowed: tuple[Path, ...] = ()  # resolved, from the command line and the environment

    @classmethod
    def for_recipe(cls, recipe_file: Path, allow: Iterable[str | Path] = ()) -> Confinement:
        from_env = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]
        dirs = [*allow, *from_env]
        return cls(recipe_root(recipe_file), tuple(Path(d).expanduser().resolve() for d in dirs))

    @property
    def given(self) -> tuple[str, ...]:
        """The allowed folders as the command line of a worker process passes them on."""
        return tuple(str(p) for p in self.allowed)

    def permits(self, real: Path, *, reading: bool = True) -> bool:
        from runner.recipe.starters import DEMO_SETS  # the runner's own demo data sets

        areas = (self.root, *self.allowed, *((DEMO_SETS.resolve(),) if reading else ()))
        return any(_inside(real, area) for area in areas)

    def read_problem(self, value: str, target: Path, label: str | None = None) -> str | None:
        """Why a recipe may not read `target` (the recipe's `value` names it), or None."""
        real = target.expanduser().resolve()
        shown = label or repr(value)
        special = special_file(real)
        if special:
            return (
                f"{shown} is {special}; a recipe may name only regular files and folders, "
                "even where paths are allowed: point it at a regular file"
            )
        if self.permits(real):
            return None
        folder = real if real.is_dir() else real.parent
        return (
            f"{shown} resolves to {real}, outside the recipe root {self.root}; move it into "
            f"{self.root}, or if you trust this recipe run with --allow-path {folder}"
        )

    def check_found(self, where: str, key: str, files: Sequence[Path], named: str) -> None:
        """Re-check files found by a glob or in a folder at the point of reading them: a link
        among them may lead out, or have been swapped in since the recipe was loaded."""
        for f in files:
            problem = self.read_problem(named, f, f"{f} (found by {named!r})")
            if problem:
                raise RecipeError(f"{where}: $.{key}: {problem}")


def _glob_base(value: str) -> str:
    """The folder part of a glob before its first wildcard ("data/**/*.jsonl" -> "data")."""
    fixed: list[str] = []
    for part in Path(value).parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def read_paths(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """(key, value) of every path key the recipe writes (hub ids among them; not the tiny
    corpus "train", which names the recipe's own training texts, read through dataset.path),
    each [[dataset.sources]] table's path and template files too."""
    from runner.recipe.layers import PATH_KEYS, SOURCE_PATH_KEYS
    from runner.recipe.model import TINY_CORPUS_TRAIN

    found: list[tuple[tuple[str | int, ...], str]] = []
    for key in (*PATH_KEYS, ("launch", "config_file")):
        node: Any = data
        for part in key:
            node = node.get(part) if isinstance(node, dict) else None
        if key == ("model", "tiny", "corpus") and node == TINY_CORPUS_TRAIN:
            continue
        if isinstance(node, str) and node:
            found.append((key, node))
    sources = data.get("dataset", {}).get("sources")
    for i, source in enumerate(sources if isinstance(sources, list) else []):
        for name in SOURCE_PATH_KEYS:
            value = source.get(name) if isinstance(source, dict) else None
            if isinstance(value, str) and value:
                found.append((("dataset", "sources", i, name), value))
    return found


def path_kind(key: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The key whose rules a path key follows: a [[dataset.sources]] table's path is read as
    dataset.path is (a hub id, a file, folder or glob), its template files as template's."""
    if key[:2] == ("dataset", "sources") and key[-1] == "path":
        return ("dataset", "path")
    return key


def path_errors(
    written: dict[str, Any],
    base_dir: Path,
    confinement: Confinement,
    run_dir_from_command_line: bool,
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every path key of the recipe (as written, parents rebased onto `base_dir`) checked
    against the confinement; the run directory checked unless the command line chose it."""
    from runner.recipe.layers import is_local_path

    errors: list[tuple[tuple[str | int, ...], str]] = []
    for key, value in read_paths(written):
        kind = path_kind(key)
        if kind in (("model", "name_or_path"), ("dataset", "path")) and not is_local_path(
            kind, value, base_dir
        ):
            continue  # a hub id
        globbed = kind == ("dataset", "path") and any(c in value for c in "*?[")
        target = Path(_glob_base(value) if globbed else value).expanduser()
        problem = confinement.read_problem(value, base_dir / target)
        if problem:
            errors.append((key, problem))
    errors.extend(run_dir_errors(written, confinement, run_dir_from_command_line))
    return errors


def run_dir_errors(
    written: dict[str, Any], confinement: Confinement, from_command_line: bool
) -> list[tuple[tuple[str, ...], str]]:
    """A recipe's own output_dir must lie inside the recipe root (or an allowed folder); the
    default runs/<name> is under the folder the person chose to run in, but not through a link."""
    section = written.get("recipe", {})
    out = section.get("output_dir")
    if isinstance(out, str) and not from_command_line:
        real = (Path.cwd() / Path(out).expanduser()).resolve()
        if special_file(real) or not confinement.permits(real, reading=False):
            return [
                (
                    ("recipe", "output_dir"),
                    f"{out!r} resolves to {real}, outside the recipe root {confinement.root}; "
                    "a recipe may write only inside its root: remove output_dir (the run goes to "
                    "runs/<name> here), or choose the folder yourself with "
                    f"--set recipe.output_dir={real} or --allow-path {real}",
                )
            ]
        return []
    name = section.get("name")
    if out is None and isinstance(name, str):
        default = Path.cwd().resolve() / "runs" / name
        real = default.resolve()
        if real != default:
            return [
                (
                    ("recipe", "name"),
                    f"the run directory runs/{name} is a link to {real}; the runner never "
                    f"follows links out of the current folder: remove the link "
                    f"(rm {default}) or choose the folder with --set recipe.output_dir=DIR",
                )
            ]
    return []


# ------------------------------------------------------------------------------------ model code


def code_sha256(folder: Path) -> str:
    """One sha256 over every *.py file of a model folder (relative path and content, sorted):
    the code `trust_remote_code = true` would import from it."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        h.update(f"{f.relative_to(folder).as_posix()}\0".encode())
        h.update(hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def _foreign_code(folder: Path) -> str | None:
    """An auto_map entry that fetches code from another hub repository ("owner/repo--mod.Cls"):
    that code is not pinned by anything the recipe writes."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        values = auto_map.values() if isinstance(auto_map, dict) else []
        for value in values:
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and "--" in ref:
                    return f"{name} auto_map {ref!r}"
    return None


def remote_code_errors(data: dict[str, Any], base_dir: Path) -> list[tuple[tuple[str, ...], str]]:
    """trust_remote_code = true runs the model's Python files: a hub model must be pinned to a
    full commit hash, a local folder's code to its sha256 written in the recipe."""
    from runner.recipe.layers import is_local_path
    from runner.recipe.model import BUILTIN_TINY

    model = data["model"]
    name = model["name_or_path"]
    if not model["trust_remote_code"] or name == BUILTIN_TINY:
        return []
    pinned = model.get("code_sha256")
    if is_local_path(("model", "name_or_path"), name, base_dir):
        folder = (base_dir / Path(name).expanduser()).resolve()
        if not folder.is_dir():
            return []  # reported as a missing model folder where it is read
        actual = code_sha256(folder)
        foreign = _foreign_code(folder)
        if foreign:
            return [
                (
                    ("model", "trust_remote_code"),
                    f"{folder}: {foreign} loads code from another hub repository, which no "
                    "hash pins; set trust_remote_code = false or vendor that code into the folder",
                )
            ]
        if pinned is None:
            return [
                (
                    ("model", "trust_remote_code"),
                    f"trust_remote_code = true runs the *.py files of {folder}; read them, then "
                    f'pin them with code_sha256 = "{actual}" in [model] '
                    "(or set trust_remote_code = false)",
                )
            ]
        if pinned != actual:
            return [
                (
                    ("model", "code_sha256"),
                    f"the *.py files of {folder} hash to {actual}, not {pinned}: the code "
                    f'changed; read it, then set code_sha256 = "{actual}"',
                )
            ]
        return []
    revision = model.get("revision")
    if not isinstance(revision, str) or not COMMIT.match(revision):
        key = ("model", "revision") if revision else ("model", "trust_remote_code")
        return [
            (
                key,
                f"trust_remote_code = true needs model.revision to be a full 40-hex commit "
                f"hash (now {repr(revision) if revision else 'not set'}), so the code that "
                "runs cannot change under you; "
                f"copy it from the commit history of {name} on the hub",
            )
        ]
    if pinned is not None:
        return [
            (
                ("model", "code_sha256"),
                "code_sha256 pins a local folder's code; a hub model is pinned by "
                "model.revision: remove code_sha256",
            )
        ]
    return []


def check_code_unchanged(recipe_data: dict[str, Any], folder: Path, where: str) -> None:
    """Right before model code may run: the local folder's code is still what the recipe pins."""
    model = recipe_data["model"]
    if not model.get("trust_remote_code") or not folder.is_dir():
        return
    pinned = model.get("code_sha256")
    actual = code_sha256(folder)
    if pinned is not None and pinned != actual:
        raise RecipeError(
            f"{where}: $.model.code_sha256: the *.py files of {folder} hash to {actual}, "
            f"not {pinned}: the code changed since the recipe was loaded; read it, then set "
            f'code_sha256 = "{actual}"'
        )

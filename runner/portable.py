"""What makes an export folder usable on another machine: the base model named as the user knows
it, and a recipe.toml that runs again from the export folder. Imports no torch.

The base: a hub id (with its revision), `builtin:tiny-glm` (a name the runner understands; the
model card says how to build it), or a local folder written relative to the export folder, never
an absolute cache path.
The recipe: the resolved recipe (defaults, parents and overrides applied) with the files it reads
(data, templates, the tiny model's corpus) copied under `inputs/`, keeping their layout inside
the recipe root, and its path keys rewritten to those copies; keys that only make sense on the
machine that ran it (the run directory, multi-node addresses) are left out. Only files the recipe
may read are copied: each is checked against its confinement again (a link in a data folder may
lead out of the root).
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.data.sources import local_files
from runner.errors import RecipeError
from runner.recipe import BUILTIN_TINY, TINY_CORPUS_TRAIN, Recipe
from runner.recipe.layers import is_local_path
from runner.recipe.mix import rekeyed, source_recipes

INPUTS = "inputs"
# Keys that name the machine that ran the recipe, not the training: left out of the export.
MACHINE_KEYS = (
    ("recipe", "output_dir"),
    ("launch", "machine_rank"),
    ("launch", "main_process_ip"),
    ("launch", "main_process_port"),
    ("launch", "config_file"),
)


@dataclass(frozen=True)
class Base:
    """The base model as an export names it."""

    name: str  # hub id, builtin:tiny-glm, or a folder relative to the export folder
    kind: str  # hub | builtin | local
    revision: str | None = None


def base_model(recipe: Recipe, out: Path) -> Base:
    """How `out` (the export folder) names the recipe's base model."""
    name = str(recipe.get("model.name_or_path"))
    if name == BUILTIN_TINY:
        return Base(name, "builtin")
    if not is_local_path(("model", "name_or_path"), name, recipe.base_dir):
        return Base(name, "hub", recipe.get("model.revision"))
    return Base(_relative(recipe.resolve(name), out.resolve()), "local")


def _relative(target: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(target, start)).as_posix()
    except ValueError:  # another drive (Windows): nothing relative exists
        return target.as_posix()


@dataclass
class PortableRecipe:
    data: dict[str, Any]
    copies: dict[Path, str] = field(default_factory=dict)  # source file -> path in the export
    dropped: list[str] = field(default_factory=list)  # machine keys left out

    @property
    def data_path(self) -> str:
        """The data as the exported recipe names it (each source's path for a mix)."""
        sources = self.data["dataset"].get("sources")
        if sources:
            return ", ".join(str(s["path"]) for s in sources)
        return str(self.data["dataset"]["path"])


def _get(data: dict[str, Any], key: tuple[str, ...]) -> Any:
    node: Any = data
    for part in key:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(data: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    node = data
    for part in key[:-1]:
        node = node[part]
    if value is None:
        node.pop(key[-1], None)
    else:
        node[key[-1]] = value


class _Placer:
    """Where each copied file goes: inputs/<its path inside the recipe root>, or
    inputs/external/<name> for a folder the person running allowed outside the root."""

    def __init__(self, recipe: Recipe, copies: dict[Path, str]) -> None:
        self.root = recipe.confinement.root if recipe.confinement else recipe.base_dir.resolve()
        self.copies = copies
        self.external: dict[Path, str] = {}

    def anchor(self, path: Path) -> str:
        """The export path of a file or folder (resolved here)."""
        path = path.resolve()
        if path == self.root or self.root in path.parents:
            return f"{INPUTS}/{path.relative_to(self.root).as_posix()}"
        if path not in self.external:
            taken = set(self.external.values())
            name, n = path.name, 1
            while f"{INPUTS}/external/{name}" in taken:
                n += 1
                name = f"{n}-{path.name}"
            self.external[path] = f"{INPUTS}/external/{name}"
        return self.external[path]

    def add(self, source: Path, at: str) -> None:
        self.copies[source] = at


def _file(recipe: Recipe, dotted: str) -> Path:
    """The file a path key names, checked again against what the recipe may read."""
    source = recipe.resolve(str(recipe.get(dotted)))
    if not source.is_file():
        raise RecipeError(
            f"{recipe.origin(dotted)}: $.{dotted}: {source} not found; the exported recipe "
            "needs it: restore it, or export from a checkout that has it"
        )
    recipe.check_found(dotted, [source])
    return source.resolve()


def portable_recipe(recipe: Recipe, out: Path) -> PortableRecipe:
    """The resolved recipe as the export folder `out` writes it (paths relative to that folder),
    and the files to copy there. RecipeError when a file it reads is missing or not allowed."""
    data = copy.deepcopy(_drop_none(recipe.data))
    data.pop("extends", None)
    data.pop("unset", None)
    result = PortableRecipe(data)
    for key in MACHINE_KEYS:
        if _get(recipe.written, key) is not None:  # a default (machine_rank 0) goes unsaid
            result.dropped.append(".".join(key))
        if _get(data, key) is not None:
            _set(data, key, None)
    placer = _Placer(recipe, result.copies)
    if recipe.is_builtin_model and recipe.get("model.tiny.corpus") != TINY_CORPUS_TRAIN:
        corpus = _file(recipe, "model.tiny.corpus")
        placer.add(corpus, placer.anchor(corpus))
        data["model"]["tiny"]["corpus"] = "./" + placer.anchor(corpus)
    elif not recipe.is_builtin_model:
        data["model"].pop("tiny", None)  # only the built-in model reads it (defaults otherwise)
        base = base_model(recipe, out)
        if base.kind == "local":  # weights are not copied: the folder, seen from the export
            data["model"]["name_or_path"] = base.name
    mix = source_recipes(recipe)
    if not mix:
        _dataset(recipe, data["dataset"], placer)
    for one in mix:  # each source's data and its own template files
        with rekeyed(one):
            written = data["dataset"]["sources"][one.index]
            _dataset(one.recipe, written, placer)
            for part in ("prompt_file", "response_file"):
                if part in written:
                    copied = _file(one.recipe, f"template.{part}")
                    placer.add(copied, placer.anchor(copied))
                    written[part] = "./" + placer.anchor(copied)
    for part in ("prompt_file", "response_file"):
        if isinstance(data["template"].get(part), str):
            source = _file(recipe, f"template.{part}")
            placer.add(source, placer.anchor(source))
            data["template"][part] = "./" + placer.anchor(source)
    return result


def _dataset(recipe: Recipe, section: dict[str, Any], placer: _Placer) -> None:
    """dataset.path: its data files copied (only those the loader reads), the value rewritten
    to the copy of the file, folder or glob it names; a hub id stays as it is."""
    raw = str(recipe.get("dataset.path"))
    files = local_files(recipe)  # confinement-checked; None for a hub id
    if files is None:
        return
    globbed = any(ch in raw for ch in "*?[")
    if globbed:
        fixed: list[str] = []
        for part in Path(raw).parts:
            if any(c in part for c in "*?["):
                break
            fixed.append(part)
        anchor_dir = recipe.resolve(str(Path(*fixed)) if fixed else ".")
        pattern = Path(raw).relative_to(Path(*fixed)).as_posix() if fixed else raw
    else:
        anchor_dir = recipe.resolve(raw)
        pattern = ""
    where = placer.anchor(anchor_dir.resolve())
    if anchor_dir.is_dir():
        for f in files:  # found under anchor_dir (rglob or glob), so relative to it
            placer.add(f, f"{where}/{Path(os.path.relpath(f, anchor_dir)).as_posix()}")
    else:
        placer.add(files[0], where)
    section["path"] = "./" + where + (f"/{pattern}" if pattern else "")


def write_portable_recipe(recipe: Recipe, folder: Path, portable: PortableRecipe) -> None:
    """recipe.toml and the files it reads (`portable_recipe`, made before anything is written
    so that a missing file leaves nothing behind), written into `folder`, the export being
    built."""
    import tomli_w

    for source, at in portable.copies.items():
        target = folder / at
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # the content: a link is not copied as a link
    header = [
        f"# {recipe.name}: exported by `recipe export` from {recipe.path.name},",
        "# resolved (defaults, parents and overrides applied); the files it reads are copied",
        "# under inputs/.",
        "# Run it again from this folder: recipe run recipe.toml",
    ]
    if portable.dropped:
        header.append(
            "# Left out (they name the machine that ran it; set them with --set): "
            + ", ".join(portable.dropped)
        )
    text = "\n".join(header) + "\n" + tomli_w.dumps(portable.data)
    (folder / "recipe.toml").write_text(text, encoding="utf-8")


def _drop_none(data: Any) -> Any:
    """TOML has no null: a key whose value is None is left out (it reads back as its default)."""
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return data

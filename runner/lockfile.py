"""`recipe lock` and `recipe run --locked`: pin what a recipe's result depends on besides the
recipe itself, next to it in version control.

RECIPE.lock (TOML) records the model (hub: the commit hash the revision resolved to; local folder
or builtin: its identity hash from `model_identity`), the data set (hub: the commit; local: each
file's sha256), the template files' sha256, and the versions of the libraries that change results
(importlib.metadata, never an import of torch). All paths in it are relative to the recipe file,
so a lock made in one clone checks out in another (except a local model folder's weight files,
identified by size and mtime as in the fingerprints: a copied folder needs `recipe lock` again).

Resolving a hub revision needs the network: without it `recipe lock` fails with one line that
says so (a lock that pins nothing would be a false promise); a revision that already is a commit
hash is recorded as is, without the network. `recipe run --locked` needs no network: it compares
what it can see (files, identities, versions, the revisions the recipe asks for) with the lock,
refuses with one line per drift, and runs hub models and data sets at the locked commits.
Imports no torch.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from runner.data.sources import data_identity, dataset_identity
from runner.errors import RecipeError
from runner.models.resolve import model_identity
from runner.recipe import Recipe, flatten
from runner.recipe.mix import rekeyed, source_recipes
from runner.state import fingerprint, write_text_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCK_VERSION = 1
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
RUNNER = "recipe-runner"  # this project's distribution name
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def lock_path(recipe_file: Path) -> Path:
    """recipes/adgen.toml -> recipes/adgen.toml.lock"""
    return recipe_file.with_name(recipe_file.name + ".lock")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    return {name: package_version(name) for name in (*LIBRARIES, RUNNER)}


def hub_commit(kind: str, repo_id: str, revision: str) -> str:
    """The commit hash `revision` (branch, tag or commit) of a hub model or data set names now."""
    if COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi

    api = HfApi()
    info = (
        api.model_info(repo_id, revision=revision)
        if kind == "model"
        else api.dataset_info(repo_id, revision=revision)
    )
    if not info.sha:
        raise LookupError("the hub gave no commit hash")
    return str(info.sha)


def _commit(recipe: Recipe, kind: str, repo_id: str, revision: str) -> str:
    key = f"{kind}.revision"
    try:
        return hub_commit(kind, repo_id, revision)
    except Exception as e:  # offline, auth, missing repo or revision: one line
        detail = str(e).splitlines()[0] if str(e) else ""
        raise RecipeError(
            f"{recipe.origin(key)}: $.{key}: cannot resolve {revision!r} of {kind} {repo_id} to a "
            f"commit ({type(e).__name__}: {detail}); run `recipe lock` with network access, "
            f"or set {key} to a commit hash"
        ) from None


def _dataset_entry(recipe: Recipe, resolve_hub: bool) -> dict[str, Any]:
    """One data set's lock entry: its hub revision (and commit), or its files' hashes."""
    ds = dataset_identity(recipe)
    dataset: dict[str, Any] = {"path": recipe.get("dataset.path")}
    if "hub" in ds:
        dataset.update(kind="hub", revision=ds["revision"])
        if ds["name"] is not None:
            dataset["name"] = ds["name"]
        if resolve_hub:
            dataset["commit"] = _commit(recipe, "dataset", ds["hub"], ds["revision"])
    else:
        dataset.update(kind="local", files=ds["files"])
    return dataset


def current_lock(recipe: Recipe, resolve_hub: bool) -> dict[str, Any]:
    """What the lock records for `recipe` now; hub commits only when `resolve_hub`."""

    name = recipe.get("model.name_or_path")
    ident = model_identity(recipe)
    model: dict[str, Any] = {"name_or_path": name, "kind": ident["kind"]}
    if ident["kind"] == "hub":
        model["revision"] = ident["revision"]
        if resolve_hub:
            model["commit"] = _commit(recipe, "model", name, ident["revision"])
    else:
        model["identity"] = fingerprint(ident)
        model["details"] = flatten({k: v for k, v in ident.items() if k != "kind"})
    sources = source_recipes(recipe)
    if sources:
        entries = []
        for s in sources:
            with rekeyed(s):
                entries.append(_dataset_entry(s.recipe, resolve_hub))
        dataset: dict[str, Any] = {"sources": entries}
    else:
        dataset = _dataset_entry(recipe, resolve_hub)
    return {
        "lock_version": LOCK_VERSION,
        "recipe": recipe.path.name,
        "model": model,
        "dataset": dataset,
        "templates": data_identity(recipe)["templates"],  # a mix: every source's
        "libraries": library_versions(),
    }


def write_lock(recipe: Recipe, recipe_file: Path) -> Path:
    """Write RECIPE.lock next to the recipe file (atomically); return its path."""
    import tomli_w

    lock = current_lock(recipe, resolve_hub=True)
    path = lock_path(recipe_file)
    text = (
        f"# The lock of {recipe_file.name}, written by `recipe lock`; commit it with the recipe.\n"
        "# `recipe run --locked` refuses to run when anything here drifts, and runs hub models\n"
        "# and data sets at the commits below. Re-run `recipe lock` to accept a change.\n\n"
        + tomli_w.dumps(lock)
    )
    write_text_atomic(path, text)
    return path


def read_lock(recipe_file: Path) -> dict[str, Any]:
    path = lock_path(recipe_file)
    relock = f"create it with `recipe lock {recipe_file}`"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no lock file; {relock}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read: {e}; {relock}") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {str(e).splitlines()[0]}; {relock}") from None
    if data.get("lock_version") != LOCK_VERSION:
        raise RecipeError(
            f"{path}: lock_version {data.get('lock_version')!r}, this runner reads "
            f"{LOCK_VERSION}; {relock}"
        )
    for table in ("model", "dataset", "templates", "libraries"):
        if not isinstance(data.get(table), dict):
            raise RecipeError(f"{path}: [{table}] missing; {relock}")
    return data


def _show(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40,64}", value):
        return value[:12]
    return str(value)


def check_lock(recipe: Recipe, recipe_file: Path) -> tuple[list[str], list[str]]:
    """(drifts, pins): one message per thing that differs from RECIPE.lock, and the --set
    overrides that make hub models and data sets run at the locked commits."""
    lock = read_lock(recipe_file)
    now = current_lock(recipe, resolve_hub=False)
    where = lock_path(recipe_file)
    relock = f"run `recipe lock {recipe_file}` to accept it"
    drifts: list[str] = []
    pins: list[str] = []

    def drift(key: str, old: Any, new: Any, fix: str = f"restore it or {relock}") -> None:
        drifts.append(f"{where}: {key}: locked {_show(old)}, now {_show(new)}; {fix}")

    def compare(prefix: str, old: dict[str, Any], new: dict[str, Any], fmt: str) -> None:
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                drift(fmt.format(prefix=prefix, key=key), old.get(key), new.get(key))

    def hub(section: str, old: dict[str, Any], new: dict[str, Any], label: str) -> None:
        if new["revision"] == old.get("revision"):
            if old.get("commit"):  # a source's by its index: dataset.sources[1].revision=...
                pins.append(f"{label}.revision={old['commit']}")
        elif new["revision"] != old.get("commit"):
            drift(f"{label}.revision", old.get("revision"), new["revision"])
        if section == "dataset" and old.get("name") != new.get("name"):
            drift(f"{label}.name", old.get("name"), new.get("name"))

    def source(
        section: str,
        where: str,
        local: Callable[[dict[str, Any], dict[str, Any], str], None],
        old: dict[str, Any],
        new: dict[str, Any],
        label: str,
    ) -> None:
        """Same place (`where`), same kind, then the hub's pins or the local files' contents."""
        if old.get(where) != new[where]:
            drift(f"{label}.{where}", old.get(where), new[where])
        elif old.get("kind") != new["kind"]:
            drift(f"{label}.kind", old.get("kind"), new["kind"])
        elif new["kind"] == "hub":
            hub(section, old, new, label)
        else:
            local(old, new, label)

    def local_model(old: dict[str, Any], new: dict[str, Any], label: str) -> None:
        if old.get("identity") != new["identity"]:
            before = len(drifts)
            compare(label, old.get("details") or {}, new["details"], "{prefix}.{key}")
            if len(drifts) == before:
                drift(f"{label}.identity", old.get("identity"), new["identity"])

    def local_dataset(old: dict[str, Any], new: dict[str, Any], label: str) -> None:
        compare(f"{label}.files", old.get("files") or {}, new["files"], '{prefix}["{key}"]')

    source("model", "name_or_path", local_model, lock["model"], now["model"], "model")
    if "sources" in now["dataset"] or "sources" in lock["dataset"]:
        locked = lock["dataset"].get("sources")
        current = now["dataset"].get("sources")
        if not isinstance(locked, list) or not isinstance(current, list):
            drift(
                "dataset.sources",
                "a mix" if locked else "one data set",
                "a mix" if current else "one data set",
            )
        elif len(locked) != len(current):
            drift("dataset.sources", f"{len(locked)} sources", f"{len(current)} sources")
        else:
            for i, (old, new) in enumerate(zip(locked, current, strict=True)):
                label = f"dataset.sources[{i}]"
                source("dataset", "path", local_dataset, old, new, label)
    else:
        source("dataset", "path", local_dataset, lock["dataset"], now["dataset"], "dataset")
    compare("templates", lock["templates"], now["templates"], '{prefix}["{key}"]')

    for name in sorted(set(lock["libraries"]) | set(now["libraries"])):
        old, new = lock["libraries"].get(name), now["libraries"].get(name)
        if old != new:
            fix = relock
            if old not in (None, "not installed"):
                fix = f"pip install {name}=={old}, or {relock}"
            drift(f"libraries.{name}", old, new, fix)
    return drifts, pins


def apply_lock(recipe: Recipe, recipe_file: Path) -> Recipe:
    """`recipe` checked against RECIPE.lock and pinned to its hub commits; RecipeError (one line
    per drift) when anything drifted."""
    drifts, pins = check_lock(recipe, recipe_file)
    if drifts:
        raise RecipeError(drifts)
    if not pins:
        return recipe
    from runner.recipe.load import load_recipe

    return load_recipe(recipe_file, (*recipe.overrides, *pins), recipe.allowed, recipe.unsets)

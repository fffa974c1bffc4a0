"""Fingerprints, content hashes, and the atomic writers of everything the runner writes: JSON
and text files (temp file + rename) and folders (built in a hidden sibling, swapped in). The
layout of the run directory and the reading of its state files are runner/rundir.py's.
Imports no torch."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from runner import faults
from runner.errors import RecipeError


def cache_root() -> Path:
    """Where the runner keeps what it builds once for any run (models, tokenizers, datasets):
    RECIPE_CACHE, else ~/.cache/recipe."""
    return Path(os.environ.get("RECIPE_CACHE", "~/.cache/recipe")).expanduser()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(payload).encode("utf-8")).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_size(path: Path) -> int | None:
    """A stage output's size: what its state file records and the plan compares. No content
    hash: earlier versions recorded one that nothing read, and hashing every output (the
    Arrow datasets, the adapter) on each run or `plan` costs more than the size check misses
    (an edit that keeps the size); old state files with a sha256 stay readable."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON with sorted keys to a temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, sort_keys=True, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        faults.before_state_rename(path)  # test-only fault injection (runner/faults.py)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, also when a library wrapped the OSError (its cause or context)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def link_message(link: Path) -> str:
    return (
        f"{link}: is a symbolic link (to {os.readlink(link)}); the runner never follows links "
        f"out of the folders it writes: remove the link (rm {link}) and run again"
    )


def refuse_links(*paths: Path) -> None:
    """One line instead of `Cannot call rmtree on a symbolic link`, or a swap that would move
    a link's target away: the runner deletes and replaces only what it wrote."""
    for p in paths:
        if p.is_symlink():
            raise RecipeError(link_message(p))


def first_link(folder: Path) -> Path | None:
    """The first symbolic link anywhere under `folder` (links not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            if os.path.islink(os.path.join(dirpath, name)):
                return Path(dirpath) / name
    return None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; a reader never sees a half-written one."""
    import shutil

    old = final.with_name(f".{final.name}.old")
    refuse_links(tmp, final, old)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp_dir(final: Path) -> Path:
    """An empty sibling folder to build `final` in."""
    import shutil

    tmp = final.with_name(f".{final.name}.tmp")
    refuse_links(tmp)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temp file in the same folder, then rename: never a half-written file.
    The file gets the usual permissions (umask), not mkstemp's owner-only 0600: reports are
    meant to be shared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

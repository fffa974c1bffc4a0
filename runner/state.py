"""Fingerprints, content hashes, atomic JSON state files and the run lock. Imports no torch."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner import __version__, faults
from runner.errors import RecipeError

STATE_VERSION = 1
STATE_KEYS = {
    "schema_version",
    "runner_version",
    "stage",
    "status",
    "fingerprint",
    "params",
    "inputs",
    "outputs",
    "upstream",
    "libraries",
    "started",
    "ended",
    "metrics",
}


STATUSES = ("running", "done", "failed", "interrupted")
# What each field must hold for the plan, `recipe status` and the stages to use it without
# checking again; a state file is hand-editable JSON, so "parses" is not enough.
_STR, _OPT_STR, _DICT = (str,), (str, type(None)), (dict,)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "runner_version": _STR,
    "stage": _STR,
    "status": _STR,
    "fingerprint": _STR,
    "params": _DICT,
    "inputs": _DICT,
    "outputs": (list,),
    "upstream": _DICT,
    "libraries": _DICT,
    "started": _OPT_STR,
    "ended": _OPT_STR,
    "metrics": _DICT,
    "error": _OPT_STR,  # optional: the one-line reason of a failed run
}
_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


class CorruptState(Exception):
    """A state file exists but cannot be trusted."""


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def state_problem(state: dict[str, Any], stage: str) -> str | None:
    """What makes a parsed state file unusable, or None."""
    for key, types in FIELD_TYPES.items():
        if key not in state:
            continue
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join("null" if t is type(None) else _TYPE_NAMES[t] for t in types)
            return f"{key} is {_type_name(value)}, expected {wanted}"
    if state["status"] not in STATUSES:
        return f"status {state['status']!r} is not one of {', '.join(STATUSES)}"
    if not re.fullmatch(r"[0-9a-f]{1,64}", state["fingerprint"]):
        # it names the checkpoint attempt folder: never a path
        return f"fingerprint {state['fingerprint'][:40]!r} is not a hex digest"
    if state["stage"] != stage:
        return f"stage {state['stage']!r} in the file of stage {stage!r}"
    for name, value in (*state["upstream"].items(), *state["libraries"].items()):
        if not isinstance(value, str):
            return f"upstream/libraries entry {name} is {_type_name(value)}, expected a string"
    for i, out in enumerate(state["outputs"]):
        if not (
            isinstance(out, dict)
            and isinstance(out.get("path"), str)
            and isinstance(out.get("size"), int)
            and not isinstance(out.get("size"), bool)
        ):
            return f"outputs[{i}] is not {{path, sha256, size}}"
    return None


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


def describe_path(path: Path) -> dict[str, Any]:
    """sha256 and size of a file, or of a folder's files (sorted by relative path)."""
    if path.is_file():
        return {"sha256": sha256_file(path), "size": path.stat().st_size}
    if path.is_dir():
        h = hashlib.sha256()
        size = 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            h.update(f"{rel}\0{sha256_file(f)}\n".encode())
            size += f.stat().st_size
        return {"sha256": h.hexdigest(), "size": size}
    raise FileNotFoundError(path)


def path_size(path: Path) -> int | None:
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


def read_state(path: Path) -> dict[str, Any] | None:
    """The state in `path`, None when absent; CorruptState when it cannot be trusted."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptState(f"{path}: unreadable ({e})") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptState(
            f"{path}: not valid JSON (line {e.lineno}); it will be rewritten"
        ) from None
    if not isinstance(state, dict) or not set(state) >= STATE_KEYS:
        missing = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else ["everything"]
        raise CorruptState(f"{path}: missing {', '.join(missing)}; it will be rewritten")
    problem = state_problem(state, path.stem)
    if problem:
        raise CorruptState(f"{path}: {problem}; it will be rewritten")
    if state["schema_version"] != STATE_VERSION:
        raise CorruptState(
            f"{path}: state version {state['schema_version']}, expected {STATE_VERSION}"
        )
    return state


def state_metrics(path: Path) -> dict[str, Any]:
    """The metrics of a stage's state file; {} when it is absent or cannot be trusted (readers
    that only show or sum metrics must not crash on a hand-edited file)."""
    try:
        state = read_state(path)
    except CorruptState:
        return {}
    return dict(state["metrics"]) if state else {}


def new_state(stage: str) -> dict[str, Any]:
    return {"schema_version": STATE_VERSION, "runner_version": __version__, "stage": stage}


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None  # the holder has not written its pid yet


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One `recipe run` per run directory. The lock is an flock on `.lock`, which the kernel
    releases when its process ends, however it ends, so a lock left by a dead process (kill -9,
    power loss) is simply taken over; the file holds the holder's pid for the message."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    while True:
        try:  # never through a link: it would truncate the file it points to
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if lock.is_symlink():
                raise RecipeError(link_message(lock)) from None
            raise RecipeError(f"{lock}: cannot open the run lock: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _lock_holder(lock)
            who = f" (pid {holder})" if holder else ""
            stop = f"; `kill -INT {holder}` stops it after saving a checkpoint" if holder else ""
            raise RecipeError(
                f"{run_dir}: another `recipe run`{who} is using this run directory; "
                f"wait for it to finish{stop}"
            ) from None
        try:  # the holder may have released and removed the file between our open and flock
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # while still locked, so nobody locks a file that is going away
        os.close(fd)


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


OWNER_FILE = Path("state") / "owner.json"  # marks a folder the runner made its run directory


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


def claim_run_dir(run_dir: Path) -> None:
    """Before anything is written into it: `run_dir` is new, empty, or a run directory the runner
    made (it holds state/owner.json), and holds no link that a swap or a delete could follow. A
    user's folder named by a recipe is never adopted, and none of its files is replaced."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        what = "a symbolic link" if run_dir.is_symlink() else "a file, not a folder"
        raise RecipeError(
            f"{run_dir}: the run directory is {what}; the runner writes only into a folder it "
            "creates: choose another recipe.output_dir"
        )
    if not run_dir.is_dir():
        return
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")
    owner = run_dir / OWNER_FILE
    if entries and not (
        owner.is_file() and not owner.is_symlink() and not owner.parent.is_symlink()
    ):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RecipeError(
            f"{run_dir}: exists and is not a run directory (it holds {shown} and no "
            f"{OWNER_FILE.as_posix()}); the runner never adopts a folder it did not create: "
            "choose another recipe.output_dir, or empty that folder yourself"
        )
    link = first_link(run_dir)
    if link is not None:
        raise RecipeError(link_message(link))


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

"""The run directory: every path the runner writes in it, who may use it (the run lock, the
owner marker), and the one reader of its state files. Other modules name a path in a run
directory only through these constants, and read a state file only through `read_state` /
`state_metrics` (or another record the runner wrote through `read_record`), so the layout
README.md describes lives here and nowhere else. Imports no torch."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import __version__
from runner.errors import RecipeError
from runner.state import first_link, link_message, write_json_atomic

if TYPE_CHECKING:
    from runner.recipe import Recipe

# -- the layout: paths relative to the run directory ------------------------------------------
RESOLVED_RECIPE = "recipe.resolved.toml"  # the recipe with defaults and overrides applied
LOCK = ".lock"  # flock-ed by the `recipe run` using the folder; holds its pid
STATE_DIR = "state"  # state/<stage>.json
OWNER_FILE = Path(STATE_DIR) / "owner.json"  # marks a folder the runner made its run directory
SETTINGS = Path(STATE_DIR) / "settings.json"  # the --set/--unset of the last `recipe run`
FORMATTED = "data/formatted"  # format: Arrow DatasetDict (train, heldout) of prompt/response
TOKENIZED = "data/tokenized"  # tokenize: Arrow DatasetDict of input_ids/labels
LOAD_REPORT = "model/load.json"  # quantize-load: what was loaded and adapted
CHECKPOINTS = "checkpoints"  # checkpoints/<train fingerprint>/checkpoint-N, attempt.json
TRAIN_FINAL = "train/final"  # train: the adapter after the last step
LOG_HISTORY = "train/log_history.json"  # the Trainer's log history (the loss curve)
STOP_FILE = "train/stop-requested"  # a launched train stage: "stop after this step"
ADAPTER = "adapter"  # save: the adapter with recipe.toml, metrics.json and a README
COMPARE_ROWS = "compare.jsonl"  # compare: one row per held-out prompt
COMPARE_TABLE = "compare.md"
REPORT = "report.html"
LOGS = "logs"
RUN_LOG = "logs/run.log"
TENSORBOARD = "logs/tensorboard"
LAUNCH_DIR = "logs/launch"  # spec.json, result.json, rank-N.error.json of a launched train
LAUNCH_LOG = "logs/launch.log"


def state_path(run_dir: Path, stage: str) -> Path:
    return run_dir / STATE_DIR / f"{stage}.json"


def error_log(run_dir: Path, stage: str) -> Path:
    """The traceback of a stage's unexpected error."""
    return run_dir / LOGS / f"{stage}.error.log"


# -- state files ------------------------------------------------------------------------------
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


def read_record(path: Path, kind: type[dict[str, Any]] | type[list[Any]] = dict) -> Any:
    """A JSON file the runner wrote that is not a stage's state (owner.json, attempt.json, the
    log history, a launch result): its value when it parses and is a `kind`, else None. They
    are hand-editable too, and every reader treats a damaged one as absent."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, kind) else None


# -- who uses the folder ----------------------------------------------------------------------
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
    lock = run_dir / LOCK
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
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
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


def check_ownership(recipe: Recipe, force: bool) -> None:
    """Never run into the run directory of a different recipe without --force."""
    marker = recipe.run_dir / OWNER_FILE
    if marker.is_file():
        owner = read_record(marker) or {}  # unreadable or edited by hand: as no owner
        if not isinstance(owner.get("name"), str) and not force:
            raise RecipeError(
                f"{recipe.run_dir}: {OWNER_FILE.as_posix()} names no recipe (damaged or edited), "
                f"so the folder may hold another recipe's runs; pass --force to reuse it for "
                f"{recipe.name!r}, or set recipe.output_dir to another folder"
            )
        if owner.get("name") != recipe.name and not force:
            raise RecipeError(
                f"{recipe.run_dir}: holds the runs of recipe {owner.get('name')!r}, "
                f"not {recipe.name!r}; "
                "set recipe.output_dir to another folder, or pass --force to reuse it"
            )
    write_json_atomic(marker, {"name": recipe.name, "recipe": str(recipe.path)})


# -- the settings a run used ------------------------------------------------------------------
# `recipe run` records its --set/--unset (the resolved recipe is recipe.resolved.toml beside it);
# plan, status, generate, chat and export re-apply them, so they describe and use the model that
# run trained instead of calling it stale. recipe.output_dir is left out: it chose this folder.
_RUN_DIR_KEY = "recipe.output_dir"


def _key_of(item: str) -> str:
    return ".".join(part.strip() for part in item.split("=", 1)[0].split("."))


def write_settings(recipe: Recipe) -> None:
    write_json_atomic(
        recipe.run_dir / SETTINGS,
        {
            "recipe": str(recipe.path),
            "set": [s for s in recipe.overrides if _key_of(s) != _RUN_DIR_KEY],
            "unset": list(recipe.unsets),
        },
    )


def read_settings(run_dir: Path) -> tuple[list[str], list[str]]:
    """(--set items, --unset items) of the last `recipe run` in `run_dir`; empty when none ran
    or the file is damaged (then the recipe as written is followed)."""
    record = read_record(run_dir / SETTINGS) or {}
    sets, unsets = record.get("set"), record.get("unset")
    if not (isinstance(sets, list) and all(isinstance(x, str) for x in sets)):
        sets = []
    if not (isinstance(unsets, list) and all(isinstance(x, str) for x in unsets)):
        unsets = []
    return sets, unsets


def describe_settings(sets: list[str], unsets: list[str]) -> str:
    """The options as they would be typed: `--unset model.tiny --set lora.r=16`."""
    words = [*(f"--unset {u}" for u in unsets), *(f"--set {s}" for s in sets)]
    return " ".join(words).replace("\n", "\\n")  # one line


def followed_settings(
    run_dir: Path, sets: tuple[str, ...], unsets: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...], str] | None:
    """The stored settings of `run_dir` with the command's own on top, and the stored ones the
    command did not give (for a note); None when there is nothing to add."""
    stored_sets, stored_unsets = read_settings(run_dir)
    given = {_key_of(s) for s in sets}
    dropped = tuple(_key_of(u) for u in unsets)

    def kept(key: str) -> bool:  # the command's own --set/--unset of a key wins
        return key not in given and not any(key == d or key.startswith(d + ".") for d in dropped)

    extra_sets = [s for s in stored_sets if s not in sets and kept(_key_of(s))]
    extra_unsets = [u for u in stored_unsets if u not in unsets and _key_of(u) not in given]
    if not extra_sets and not extra_unsets:
        return None
    return (
        (*extra_sets, *sets),
        (*extra_unsets, *unsets),
        describe_settings(extra_sets, extra_unsets),
    )


def settings_note(recipe: Recipe) -> str | None:
    """`recipe run`: one line when the last run in this folder used other --set/--unset (this
    run uses its own; the stages they change re-run)."""
    stored_sets, stored_unsets = read_settings(recipe.run_dir)
    sets = [s for s in recipe.overrides if _key_of(s) != _RUN_DIR_KEY]
    if sorted(stored_sets) == sorted(sets) and sorted(stored_unsets) == sorted(recipe.unsets):
        return None
    if not stored_sets and not stored_unsets:
        return None  # the last run used the recipe as written: a --set now is plain to see
    used = describe_settings(stored_sets, stored_unsets)
    return (
        f"note: the last run in {recipe.run_dir} used {used}; this run uses only the options "
        "given now (pass those again to keep them)"
    )

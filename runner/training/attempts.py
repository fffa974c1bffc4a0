"""Attempts: one folder of checkpoints per train fingerprint, and the policy between them.

Each attempt folder (runner.checkpoints.attempt_dir) holds attempt.json: the train stage's
params, inputs, upstream fingerprints and library versions when the attempt started, and
whether it finished. A new attempt says what changed against the most recent other one
(runner.changes.explain), and `train.on_changed_settings = "refuse"` stops a run before an
unfinished attempt with a checkpoint is abandoned. `start_attempt` decides where training
starts; the one-process train stage and the launcher (for all its workers) both call it. No torch.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.changes import explain
from runner.checkpoints import (
    attempt_dir,
    checkpoint_problem,
    checkpoints,
    newest_valid,
    step_of,
)
from runner.errors import RecipeError
from runner.rundir import CHECKPOINTS, read_record
from runner.state import write_json_atomic

if TYPE_CHECKING:
    from runner.context import Context

ATTEMPT = "attempt.json"


def other_attempts(run_dir: Path, train_fingerprint: str) -> list[str]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != train_fingerprint)


def write_attempt(folder: Path, record: dict[str, Any]) -> None:
    write_json_atomic(folder / ATTEMPT, record)


def read_attempt(folder: Path) -> dict[str, Any] | None:
    return read_record(folder / ATTEMPT)


def previous_attempt(run_dir: Path, train_fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
    """The most recently started other attempt that recorded its settings."""
    found = []
    for name in other_attempts(run_dir, train_fingerprint):
        folder = attempt_dir(run_dir, name)
        record = read_attempt(folder)
        if record is not None:
            found.append((str(record.get("started", "")), name, folder, record))
    if not found:
        return None
    _, _, folder, record = max(found, key=lambda item: (item[0], item[1]))
    return folder, record


def describe_attempt(folder: Path, record: dict[str, Any]) -> str:
    """`attempt 1a2b... (finished)` or `attempt 1a2b... (stopped at checkpoint 8)`."""
    if record.get("finished"):
        return f"attempt {folder.name} (finished)"
    newest, _ = newest_valid(folder)
    where = f"stopped at checkpoint {step_of(newest)}" if newest else "no checkpoint"
    return f"attempt {folder.name} ({where})"


def changed_settings(run_dir: Path, current: Any) -> tuple[Path, dict[str, Any], list[str]] | None:
    """When train would start fresh although another attempt exists: that attempt, its record
    and why the fingerprints differ (runner.changes.explain). `current` is train's StageStatus."""
    if newest_valid(attempt_dir(run_dir, current.fingerprint))[0] is not None:
        return None  # this very attempt resumes
    prev = previous_attempt(run_dir, current.fingerprint)
    if prev is None:
        return None
    folder, record = prev
    return folder, record, explain(record, current)


def refuse_abandoning(recipe: Any, current: Any) -> None:
    """With train.on_changed_settings = "refuse", stop before an unfinished attempt is left
    behind because its settings changed (RecipeError, exit 2); call it before any stage runs."""
    if recipe.get("train.on_changed_settings") != "refuse":
        return
    found = changed_settings(recipe.run_dir, current)
    if found is None:
        return
    folder, record, why = found
    if record.get("finished") or newest_valid(folder)[0] is None:
        return  # nothing to resume there: starting fresh loses nothing
    raise RecipeError(
        f"{recipe.run_dir}: train: {describe_attempt(folder, record)} would be abandoned: "
        f'{"; ".join(why)}; train.on_changed_settings is "refuse": undo the change to resume '
        "it, or pass --set train.on_changed_settings=restart to start a new attempt"
    )


def start_attempt(ctx: Context, out_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None; say why, record the attempt's settings."""
    resume, skipped = newest_valid(out_dir)
    for note in skipped:
        ctx.log(f"train: {note}")
    for step, path in checkpoints(out_dir):  # half-written ones newer than the resume point
        if (resume is None or step > step_of(resume)) and checkpoint_problem(path):
            shutil.rmtree(path, ignore_errors=True)
    st = ctx.status
    if resume is not None:
        ctx.log(f"train: resumed from checkpoint {step_of(resume)} ({resume})")
    elif st is not None and (found := changed_settings(ctx.run_dir, st)) is not None:
        folder, record, why = found
        ctx.log(
            f"train: starting fresh in attempt {out_dir.name}; "
            f"{describe_attempt(folder, record)} was made with other settings and is not "
            f"resumed: {'; '.join(why)}"
        )
    elif others := other_attempts(ctx.run_dir, out_dir.name):  # attempts older than attempt.json
        ctx.log(
            "train: starting fresh; checkpoints of earlier attempts were made with other "
            f"settings and are not resumed: {', '.join(others)}"
        )
    if st is not None and (resume is None or read_attempt(out_dir) is None):
        write_attempt(
            out_dir,
            {
                **st.identity(),
                "finished": False,
                "started": dt.datetime.now(dt.timezone.utc).isoformat(),
            },
        )
    return resume

"""The trainer's checkpoints: one attempt folder per train fingerprint, newest valid one wins.

A checkpoint counts only when every file resuming needs is there and trainer_state.json parses,
so a checkpoint half-written when the process died is skipped in favour of the previous one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors")
_NAME = re.compile(r"^checkpoint-(\d+)$")


def attempt_dir(run_dir: Path, train_fingerprint: str) -> Path:
    return run_dir / "checkpoints" / train_fingerprint


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else what is wrong with it."""
    for name in REQUIRED:
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{name} missing or empty"
    if not any((path / w).is_file() and (path / w).stat().st_size > 0 for w in WEIGHTS):
        return "no weights"
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json unreadable"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json incomplete"
    return None


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """All checkpoint-N folders, newest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def newest_valid(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint and notes on the ones skipped."""
    skipped: list[str] = []
    for step, path in checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"checkpoint {step} skipped: {problem}")
    return None, skipped


def other_attempts(run_dir: Path, train_fingerprint: str) -> list[str]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != train_fingerprint)

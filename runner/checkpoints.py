"""The trainer's checkpoints: one attempt folder per train fingerprint, newest valid one wins.

A checkpoint counts only when every file resuming needs is there and readable: trainer_state.json
and adapter_config.json parse, optimizer.pt, scheduler.pt, rng_state*.pth and scaler.pt are
complete torch archives, the adapter weights' safetensors header covers the file. The Trainer
writes trainer_state.json last, so a checkpoint half-written when the process died is skipped in
favour of the previous one.

FSDP's sharded checkpoints hold no optimizer.pt and no adapter file: the adapter and the optimizer
state are dist_cp folders (pytorch_model_fsdp_0/, optimizer_0/), each complete once its .metadata
exists (dist_cp writes it after every rank's shard), beside scheduler.pt, trainer_state.json and
the rng state. The train stage loads their LoRA weights and optimizer state itself after the
Trainer's resume (runner/models/fsdp_names.py says why the Trainer's own load misses them).

Which attempt resumes or starts, and what its attempt.json records, is runner/training/
attempts.py. No torch.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from runner.rundir import CHECKPOINTS

REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors")
SHARDED = "pytorch_model_fsdp_0"
SHARDED_OPTIMIZER = "optimizer_0"
SHARDED_REQUIRED = ("trainer_state.json", "scheduler.pt")
_RNG = re.compile(r"^rng_state(_\d+)?\.pth$")  # rng_state_<rank>.pth with several processes
_NAME = re.compile(r"^checkpoint-(\d+)$")


def attempt_dir(run_dir: Path, train_fingerprint: str) -> Path:
    return run_dir / CHECKPOINTS / train_fingerprint


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded, judged from its framing, or None."""
    if path.suffix in (".pt", ".pth", ".bin"):
        try:  # torch.save writes a zip archive; a cut one has no central directory
            with zipfile.ZipFile(path):
                return None
        except (OSError, zipfile.BadZipFile):
            return f"{path.name} truncated or not a torch archive"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np"):
                return None
        except Exception:  # safetensors raises its own error type for a bad header
            return f"{path.name} truncated or not safetensors"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else what is wrong with it."""
    if (path / SHARDED).is_dir():
        return sharded_problem(path)
    for name in REQUIRED:
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{name} missing or empty"
    weights = [path / w for w in WEIGHTS if (path / w).is_file() and (path / w).stat().st_size > 0]
    if not weights:
        return "no weights"
    if problem := _trainer_state_problem(path):
        return problem
    # every archive the Trainer loads on resume, rng_state*.pth (one per process) and scaler.pt
    # included: a cut one made every resume fail with an OSError while the plan promised it
    loaded = [path / "optimizer.pt", path / "scheduler.pt", weights[0]]
    loaded += sorted(path.glob("rng_state*.pth")) + sorted(path.glob("scaler.pt"))
    for f in loaded:
        problem = _file_problem(f)
        if problem:
            return problem
    if (path / "adapter_config.json").is_file():
        try:
            json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "adapter_config.json unreadable"
    return None


def _trainer_state_problem(path: Path) -> str | None:
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json unreadable"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json incomplete"
    return None


def sharded_problem(path: Path) -> str | None:
    """checkpoint_problem for an FSDP-sharded checkpoint."""
    for name in (f"{SHARDED}/.metadata", f"{SHARDED_OPTIMIZER}/.metadata", *SHARDED_REQUIRED):
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{name} missing or empty"
    rng = sorted(p for p in path.iterdir() if _RNG.match(p.name))
    if not rng:
        return "rng_state.pth missing"
    if problem := _trainer_state_problem(path):
        return problem
    for f in (path / "scheduler.pt", *rng):
        problem = _file_problem(f)
        if problem:
            return problem
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


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])

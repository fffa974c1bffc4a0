"""The files a checkpoint or an adapter is made of: its config.json, weight shards read without
unpickling code, safetensors (which refuse shared storage), folders that appear whole."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.state import replace_dir

if TYPE_CHECKING:
    import torch


def read_config(path: Path) -> dict[str, Any] | None:
    cfg_path = path if path.is_file() else path / "config.json"
    try:
        with cfg_path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def weight_shards(src: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred, in index order when indexed."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [src / name for name in dict.fromkeys(weight_map.values())]
        if (src / single).is_file():
            return [src / single]
    found = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not found:
        raise FileNotFoundError(f"no safetensors or pytorch_model*.bin weights in {src}")
    return found


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    # weights_only: never unpickle arbitrary objects; mmap keeps big shards off the heap
    # (zip-format files only, docs/compatibility.md), so the other format is read without it.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return obj


def unshare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage: clone all but the first user."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(ptr)
        out[key] = t
    return out


@dataclass
class AtomicDir:
    """Build a directory next to ``dst`` and move it into place only when complete."""

    dst: Path
    overwrite: bool = False
    tmp: Path = field(init=False)

    def __enter__(self) -> Path:
        if self.dst.exists() and not self.overwrite:
            raise FileExistsError(f"{self.dst} exists (pass overwrite=True to replace it)")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        replace_dir(self.tmp, self.dst)  # the runner's one folder swap (runner/state.py)

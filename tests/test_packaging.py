"""An installed (non-editable) wheel carries the schema every command validates against, and the
demo data sets `recipe new` copies."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import runner
from runner.recipe.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parents[1]


def test_the_schema_is_read_from_inside_the_package() -> None:
    assert SCHEMA_PATH.parent.parent == Path(runner.__file__).parent
    assert SCHEMA_PATH.resolve() == ROOT / "schemas" / "recipe.schema.json"  # one file, linked


def archive_bytes(wheel: Path, name: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name)


@pytest.mark.slow
def test_the_wheel_includes_it(tmp_path: Path) -> None:
    """Build the wheel from a copy of the sources (offline, the installed setuptools) and look
    inside: the schema file is there, byte for byte, beside the package that reads it."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("runner", "schemas", "data"):  # runner/schemas links to ../schemas: keep it one
        shutil.copytree(
            ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        schema = archive.read("runner/schemas/recipe.schema.json")
    assert schema == (ROOT / "schemas" / "recipe.schema.json").read_bytes()
    assert "runner/recipe/schema.py" in names and "runner/py.typed" in names
    for demo in ("chat-demo/train.jsonl", "alpaca-demo/dev.jsonl", "adgen-demo/pretrain.jsonl"):
        assert (
            archive_bytes(wheel, f"runner/demo_sets/{demo}") == (ROOT / "data" / demo).read_bytes()
        )
    assert not any(n.startswith("tests/") for n in names)

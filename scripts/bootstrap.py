#!/usr/bin/env python3
"""Set up everything with nothing but Python, then run a developer task through `just`.

    python3 scripts/bootstrap.py demo     # set up, run recipes/adgen-tiny.toml end to end
    python3 scripts/bootstrap.py test     # set up, run the tests

It creates .venv, installs torch first (TORCH_SPEC, default the CPU wheel torch==2.13.0; set
TORCH_SPEC=skip to keep a torch you installed), then this project with its dev tools, including
`just` (PyPI: rust-just). A second call skips the installs while pyproject.toml is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".recipe-installed"


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def setup() -> None:
    # Runs under whatever python3 the user has, before the venv exists: keep the guard.
    if sys.version_info < (3, 10):  # noqa: UP036
        sys.exit(f"recipe needs Python >= 3.10, this is {sys.version.split()[0]}")
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + torch_spec.encode()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == want:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if torch_spec != "skip":
        sh(*pip, torch_spec)
    sh(*pip, "-e", ".[dev]")
    STAMP.write_text(want)


def main() -> None:
    tasks = sys.argv[1:] or ["--list"]
    setup()
    env = dict(
        os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(VENV)
    )
    os.chdir(ROOT)
    os.execvpe(str(BIN / "just"), [str(BIN / "just"), *tasks], env)


if __name__ == "__main__":
    main()

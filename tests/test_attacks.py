"""Recipes from strangers: each folder under attacks/ is one bad input or attack, run through the
real CLI, asserting what the person running it gets.

A case folder holds `case.toml` and a `project/` folder (the recipe root: it holds `recipe.toml`
and whatever files the case needs). The harness copies `project/` into a scratch folder next to
`outside/` (a secret file and a folder the recipe must not touch) and `home/` (HOME, so `~` stays
in the sandbox), runs the command there and asserts:

- the exit status (`exit`, default 2);
- the last line of the output equals `expect` exactly (placeholders below), so every message
  names its place and says the fix in one line;
- no traceback anywhere in the output;
- nothing outside `project/runs/` was written, changed or deleted (`outside/`, `home/`, the
  project's own files), and the secret's text appears in no output and no file under runs/.

case.toml keys:
    args       the command line after `recipe`, default ["validate", "{recipe}"]
    exit       the expected exit status (default 2)
    expect     the expected last output line
    tokenizer  a folder name under project/ to write a small byte-level tokenizer into
    symlinks   {"path/in/project" = "target"}: links made before the run (git cannot hold some)
    fifos      ["path/in/project"]: named pipes made before the run
    env        extra environment variables
    writable   paths under project/ (besides runs/) the case may change, e.g. a run dir it names
    subprocess true: run `recipe` as a real process with a 120 s limit (for cases that may hang)

Placeholders in args, expect, symlinks and env: {project} {outside} {home} {recipe}.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from runner.cli import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).parent / "attacks"
CASES = sorted(p for p in HERE.iterdir() if p.is_dir()) if HERE.is_dir() else []
SECRET = "TOP-SECRET-CANARY-7f3a"


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple[str, str]]:
    """Every path under root (links not followed) with its kind and content hash."""
    seen: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not any((here / d) == s for s in skip)]
        for name in dirnames + filenames:
            p = here / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                seen[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                seen[rel] = ("dir", "")
            elif p.is_file():
                seen[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                seen[rel] = ("special", "")
    return seen


def contains_secret(root: Path) -> list[str]:
    found = []
    if not root.exists():
        return found
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes():
            found.append(str(p.relative_to(root)))
    return found


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    from datakit import session_cache

    return session_cache(tmp_path_factory)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attack(case: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str) -> None:
    spec: dict[str, Any] = tomllib.loads((case / "case.toml").read_text(encoding="utf-8"))
    project, outside, home = tmp_path / "project", tmp_path / "outside", tmp_path / "home"
    shutil.copytree(case / "project", project, symlinks=True)
    (outside / "victim").mkdir(parents=True)
    (outside / "secret.txt").write_text(f"API_TOKEN={SECRET}\n", encoding="utf-8")
    (outside / "victim" / "keep.txt").write_text("a user's own file\n", encoding="utf-8")
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text(f"{SECRET}\n", encoding="utf-8")

    def fill(text: str) -> str:
        return (
            text.replace("{project}", str(project))
            .replace("{outside}", str(outside))
            .replace("{home}", str(home))
            .replace("{recipe}", str(project / "recipe.toml"))
        )

    if "tokenizer" in spec:
        from datakit import make_tokenizer

        make_tokenizer(project / spec["tokenizer"])
    for link, target in spec.get("symlinks", {}).items():
        (project / link).parent.mkdir(parents=True, exist_ok=True)
        (project / link).symlink_to(fill(target))
    for fifo in spec.get("fifos", []):
        (project / fifo).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(project / fifo)

    runs = project / "runs"
    allowed = [runs, *(project / w for w in spec.get("writable", []))]
    before = snapshot(tmp_path, allowed)

    args = [fill(a) for a in spec.get("args", ["validate", "{recipe}"])]
    env = {k: fill(v) for k, v in spec.get("env", {}).items()}
    env |= {"HOME": str(home), "RECIPE_CACHE": cache, "OMP_NUM_THREADS": "1"}
    monkeypatch.chdir(project)
    if spec.get("subprocess"):
        proc = subprocess.run(
            [sys.executable, "-c", "from runner.cli import main; main()", *args],
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), **env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        code, output = proc.returncode, proc.stdout + proc.stderr
    else:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("RECIPE_FAULT", raising=False)
        result = CliRunner().invoke(cli, args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
        code, output = result.exit_code, result.output

    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert code == spec.get("exit", 2), output
    assert lines and lines[-1] == fill(spec["expect"]), output
    assert SECRET not in output, output
    assert contains_secret(runs) == [], "the secret leaked into the run directory"
    assert snapshot(tmp_path, allowed) == before, "something outside runs/ changed"


def test_corpus_covers_every_category() -> None:
    """At least 100 cases, and each category of attack keeps some (a folder deleted by mistake,
    or a prefix renamed, shows here rather than as a silently smaller corpus)."""
    prefixes = {c.name.split("-", 1)[0] for c in CASES}
    assert len(CASES) >= 100
    assert prefixes >= {"path", "dir", "code", "data", "tmpl", "tok", "num", "state", "model"}

"""Unexpected errors keep their cause, hand-edited state files, and run folders we may not write
(issue 16, items 8 and 9). Cheap: the format stage is replaced by a stand-in where a test only
needs a stage to succeed or fail; nothing trains."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from runner.cli import cli
from runner.plan import compute_plan, state_path
from runner.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def formats(ctx: Any) -> dict[str, Any]:
    """Stand-in for the format stage: writes its output folder and nothing else."""
    out = ctx.run_dir / "data" / "formatted"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.txt").write_text("rows\n", encoding="utf-8")
    return {"train_rows": 16, "heldout_rows": 4}


def breaks(ctx: Any) -> dict[str, Any]:
    raise ValueError("row 3 has no column 'q'\nsecond line of the message")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def run_dir_of(recipe_file: Path) -> Path:
    return load_recipe(recipe_file).run_dir


# ---------------------------------------------------------------- an unexpected error in a stage


def test_unexpected_error_is_logged_recorded_and_shown(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runner.stages.format.run", breaks)
    monkeypatch.delenv("RECIPE_TRACEBACK", raising=False)
    run_dir = run_dir_of(small_recipe)
    result = invoke("run", small_recipe, "--until", "format")

    log = run_dir / "logs" / "format.error.log"
    line = f"error: stage format failed: ValueError: row 3 has no column 'q' (traceback in {log})"
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.splitlines()[-1] == line
    text = log.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text
    assert "in breaks" in text  # the frame that raised
    assert "ValueError: row 3 has no column 'q'\nsecond line of the message" in text
    state = json.loads(state_path(run_dir, "format").read_text(encoding="utf-8"))
    assert (state["status"], state["error"]) == ("failed", "ValueError: row 3 has no column 'q'")
    run_log = (run_dir / "logs" / "run.log").read_text(encoding="utf-8").splitlines()
    assert run_log[-1].split(" ", 1)[1] == line

    status = invoke("status", small_recipe)
    assert status.exit_code == 0, status.output
    assert "  format         pending  last: failed" in status.output
    assert "      error: ValueError: row 3 has no column 'q'\n" in status.output

    # fixed and run again: done, the reason and the stale traceback are gone
    monkeypatch.setattr("runner.stages.format.run", formats)
    assert invoke("run", small_recipe, "--until", "format").exit_code == 0
    state = json.loads(state_path(run_dir, "format").read_text(encoding="utf-8"))
    assert state["status"] == "done" and "error" not in state
    assert not log.exists()


@pytest.mark.parametrize(
    ("flag", "env"), [(["--traceback"], {}), ([], {"RECIPE_TRACEBACK": "1"})], ids=["flag", "env"]
)
def test_traceback_opt_in_reraises_the_original_error(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str], env: dict[str, str]
) -> None:
    monkeypatch.setattr("runner.stages.format.run", breaks)
    monkeypatch.delenv("RECIPE_TRACEBACK", raising=False)
    run_dir = run_dir_of(small_recipe)
    result = invoke("run", small_recipe, "--until", "format", *flag, env=env)
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError)
    assert str(result.exception).startswith("row 3 has no column 'q'")
    # still logged and recorded before it propagates
    assert (run_dir / "logs" / "format.error.log").is_file()
    state = json.loads(state_path(run_dir, "format").read_text(encoding="utf-8"))
    assert state["error"] == "ValueError: row 3 has no column 'q'"


def test_a_stage_error_is_recorded_without_a_traceback_log(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expected failures (StageError) are one line already: recorded, no error log."""
    from runner.errors import StageError

    def refuses(ctx: Any) -> dict[str, Any]:
        raise StageError("format", "template renders an empty prompt for row 2; fix it")

    monkeypatch.setattr("runner.stages.format.run", refuses)
    run_dir = run_dir_of(small_recipe)
    result = invoke("run", small_recipe, "--until", "format")
    assert result.exit_code == 1
    line = "error: stage format failed: template renders an empty prompt for row 2; fix it"
    assert result.output.splitlines()[-1] == line
    assert not (run_dir / "logs" / "format.error.log").exists()
    state = json.loads(state_path(run_dir, "format").read_text(encoding="utf-8"))
    assert state["error"] == "template renders an empty prompt for row 2; fix it"
    assert (run_dir / "logs" / "run.log").read_text().splitlines()[-1].endswith(line)


# ---------------------------------------------------------------- state files edited by hand


def test_wrong_typed_state_is_named_and_rewritten(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runner.stages.format.run", formats)
    assert invoke("run", small_recipe, "--until", "format").exit_code == 0
    run_dir = run_dir_of(small_recipe)
    path = state_path(run_dir, "format")
    state = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**state, "outputs": 5}), encoding="utf-8")

    reason = f"corrupt state: {path}: outputs is an integer, expected a list; it will be rewritten"
    plan = invoke("plan", small_recipe)
    assert plan.exit_code == 0, plan.output
    assert f"({reason})" in plan.output.splitlines()[1]
    status = invoke("status", small_recipe)
    assert status.exit_code == 0, status.output
    assert f"      why: {reason}" in status.output.splitlines()
    ran = invoke("run", small_recipe, "--until", "format")
    assert ran.exit_code == 0, ran.output
    assert f"format: running ({reason})" in ran.output
    assert json.loads(path.read_text(encoding="utf-8"))["outputs"][0]["path"] == "data/formatted"


def test_edited_fingerprint_is_explained_honestly(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runner.stages.format.run", formats)
    assert invoke("run", small_recipe, "--until", "format").exit_code == 0
    path = state_path(run_dir_of(small_recipe), "format")
    state = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**state, "fingerprint": "0" * 16}), encoding="utf-8")
    st = compute_plan(load_recipe(small_recipe))[0]
    assert (st.status, st.reasons) == (
        "stale",
        ["stored fingerprint does not match its recorded params (state edited?)"],
    )


# ---------------------------------------------------------------- a run folder we may not write


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user can read (pytest's own tmp folders are the owner's only)."""
    base = Path(tempfile.mkdtemp(prefix="recipe-ro-"))
    base.chmod(0o755)
    yield base
    for p in base.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(base)


def recipe_cli_as_other_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`recipe ARGS` as a user who cannot write the run folder: nobody when we are root (root
    writes anywhere), else ourselves after the chmod."""
    other = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
    return subprocess.run(
        [sys.executable, "-c", "from runner.cli import main; main()", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(cwd)),
        capture_output=True,
        text=True,
        timeout=120,
        **other,  # type: ignore[call-overload]
    )


def read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) | 0o444 | (0o111 * p.is_dir()))


def test_read_only_run_dir_with_everything_done_just_reports(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import SMALL_RECIPE

    project = shared_tmp
    (project / "data").mkdir()
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]
    (project / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (project / "data" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (project / "corpus.jsonl").write_text(json.dumps({"text": "some text"}) + "\n")
    recipe = project / "recipe.toml"
    recipe.write_text(SMALL_RECIPE.format(run_dir=project / "run"), encoding="utf-8")
    for p in project.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    monkeypatch.setattr("runner.stages.format.run", formats)
    assert invoke("run", recipe, "--until", "format").exit_code == 0
    run_dir = project / "run"
    read_only(run_dir)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))

    done = recipe_cli_as_other_user(["run", str(recipe), "--until", "format"], project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.splitlines() == [
        "format: skipped (up to date)",
        f"{run_dir}: read-only (Permission denied); every stage is done, nothing to write",
    ]

    todo = recipe_cli_as_other_user(["run", str(recipe), "--until", "tokenize"], project)
    assert todo.returncode == 2, todo.stdout + todo.stderr
    assert "Traceback" not in todo.stderr
    assert todo.stderr.splitlines() == [
        f"{run_dir}: cannot write the run directory (Permission denied) and tokenize must run; "
        "make it writable or set recipe.output_dir (e.g. --set recipe.output_dir=runs/mine) "
        "to a folder you can write"
    ]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


def test_owner_record_that_is_not_an_object_is_not_a_crash(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runner.stages.format.run", formats)
    owner = run_dir_of(small_recipe) / "state" / "owner.json"
    owner.parent.mkdir(parents=True)
    owner.write_text("[1, 2]\n", encoding="utf-8")
    result = invoke("run", small_recipe, "--until", "format")
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"{run_dir_of(small_recipe)}: state/owner.json names no recipe (damaged or edited), so "
        "the folder may hold another recipe's runs; pass --force to reuse it for 'small', or "
        "set recipe.output_dir to another folder"
    )

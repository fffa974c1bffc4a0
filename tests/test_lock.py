"""`recipe lock` / `recipe run --locked`: what drifts is refused, one line each; a lock made in
one clone holds in another, and two clones of a locked recipe plan identical fingerprints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner import lockfile
from runner.cli import cli
from runner.lockfile import apply_lock, check_lock, hub_commit, lock_path
from runner.plan import compute_plan
from runner.recipe import load_recipe
from runner.state import sha256_file

ROOT = Path(__file__).resolve().parents[1]
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
HUB_RECIPE = """\
[recipe]
name = "hub"

[model]
name_or_path = "owner/model"

[dataset]
path = "owner/data"

[template]
prompt = "{{ q }}"
response = "{{ a }}"
"""


def clone(dest: Path) -> Path:
    """A fresh clone of the project's recipes, templates and data (a git work tree: the recipe
    root that its ../data and ../templates are inside); returns adgen-tiny.toml."""
    (dest / ".git").mkdir(parents=True)
    for sub in ("recipes", "templates", "data"):
        shutil.copytree(ROOT / sub, dest / sub, ignore=shutil.ignore_patterns("*.lock"))
    return dest / "recipes" / "adgen-tiny.toml"


def lock(recipe: Path) -> Path:
    result = CliRunner().invoke(cli, ["lock", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {lock_path(recipe)}\n"
    return lock_path(recipe)


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # runs/ goes here
    return clone(tmp_path / "project")


def run_locked(recipe: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["run", "--locked", str(recipe)])
    return result.exit_code, result.output


def test_lock_records_model_data_templates_and_versions(tiny: Path) -> None:
    path = lock(tiny)
    assert path == tiny.parent / "adgen-tiny.toml.lock"
    text = path.read_text(encoding="utf-8")
    assert str(tiny.parent.parent) not in text  # nothing machine-specific
    data = lockfile.tomllib.loads(text)
    assert data["lock_version"] == 1
    assert data["model"]["kind"] == "builtin" and len(data["model"]["identity"]) == 16
    assert sorted(data["dataset"]["files"]) == [
        "../data/adgen-demo/dev.jsonl",
        "../data/adgen-demo/pretrain.jsonl",
        "../data/adgen-demo/train.jsonl",
    ]
    assert sorted(data["templates"]) == [
        "../templates/adgen_prompt.j2",
        "../templates/adgen_response.j2",
    ]
    assert set(data["libraries"]) == {
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "recipe-runner",
    }
    assert data["libraries"]["recipe-runner"] == lockfile.package_version("recipe-runner")


def test_unchanged_lock_lets_the_run_through(tiny: Path) -> None:
    lock(tiny)
    recipe = load_recipe(tiny)
    assert check_lock(recipe, tiny) == ([], [])
    assert apply_lock(recipe, tiny) is recipe


def test_changed_data_file_is_refused(tiny: Path, tmp_path: Path) -> None:
    lock(tiny)
    train = tiny.parent.parent / "data" / "adgen-demo" / "train.jsonl"
    old = sha256_file(train)
    with open(train, "a", encoding="utf-8") as f:
        f.write('{"content": "x", "summary": "y"}\n')
    code, output = run_locked(tiny)
    assert code == 2
    assert output == (
        f'{lock_path(tiny)}: dataset.files["../data/adgen-demo/train.jsonl"]: '
        f"locked {old[:12]}, now {sha256_file(train)[:12]}; restore it or run "
        f"`recipe lock {tiny}` to accept it\n"
    )
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_changed_library_version_is_refused(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock(tiny)
    locked = lockfile.package_version("transformers")
    real = lockfile.package_version
    monkeypatch.setattr(
        lockfile, "package_version", lambda name: "99.0.0" if name == "transformers" else real(name)
    )
    code, output = run_locked(tiny)
    assert code == 2
    assert output == (
        f"{lock_path(tiny)}: libraries.transformers: locked {locked}, now 99.0.0; "
        f"pip install transformers=={locked}, or run `recipe lock {tiny}` "
        "to accept it\n"
    )


def test_every_drift_on_its_own_line(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock(tiny)
    (tiny.parent.parent / "templates" / "adgen_prompt.j2").write_text("Q: {{ content }}\n")
    real = lockfile.package_version
    monkeypatch.setattr(
        lockfile, "package_version", lambda name: "not installed" if name == "peft" else real(name)
    )
    code, output = run_locked(tiny)
    assert code == 2
    lines = output.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        'templates["../templates/adgen_prompt.j2"]',
        "libraries.peft",
    ]
    assert all(line.startswith(f"{lock_path(tiny)}: ") for line in lines)


def test_changed_model_settings_are_named(tiny: Path) -> None:
    lock(tiny)
    recipe = load_recipe(tiny, ["model.tiny.hidden_size=512"])
    drifts, _ = check_lock(recipe, tiny)
    assert drifts == [
        f"{lock_path(tiny)}: model.hidden_size: locked 256, now 512; "
        f"restore it or run `recipe lock {tiny}` to accept it"
    ]


def test_missing_lock(tiny: Path) -> None:
    code, output = run_locked(tiny)
    assert code == 2
    assert output == (f"{lock_path(tiny)}: no lock file; create it with `recipe lock {tiny}`\n")


def test_hub_model_and_data_locked_at_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def fake(kind: str, repo_id: str, revision: str) -> str:
        asked.append((kind, repo_id, revision))
        return COMMIT_A if kind == "model" else COMMIT_B

    monkeypatch.setattr(lockfile, "hub_commit", fake)
    recipe_file = tmp_path / "hub.toml"
    recipe_file.write_text(HUB_RECIPE, encoding="utf-8")
    data = lockfile.tomllib.loads(lock(recipe_file).read_text(encoding="utf-8"))
    assert asked == [("model", "owner/model", "main"), ("dataset", "owner/data", "main")]
    assert data["model"] == {
        "name_or_path": "owner/model",
        "kind": "hub",
        "revision": "main",
        "commit": COMMIT_A,
    }
    assert data["dataset"] == {
        "path": "owner/data",
        "kind": "hub",
        "revision": "main",
        "commit": COMMIT_B,
    }
    monkeypatch.setattr(lockfile, "hub_commit", None)  # --locked needs no network
    pinned = apply_lock(load_recipe(recipe_file), recipe_file)
    assert (pinned.get("model.revision"), pinned.get("dataset.revision")) == (COMMIT_A, COMMIT_B)
    drifts, _ = check_lock(load_recipe(recipe_file, ["model.revision=v2"]), recipe_file)
    assert drifts == [
        f"{lock_path(recipe_file)}: model.revision: locked main, now v2; "
        f"restore it or run `recipe lock {recipe_file}` to accept it"
    ]


def test_lock_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(kind: str, repo_id: str, revision: str) -> str:
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(lockfile, "hub_commit", offline)
    recipe_file = tmp_path / "hub.toml"
    recipe_file.write_text(HUB_RECIPE, encoding="utf-8")
    result = CliRunner().invoke(cli, ["lock", str(recipe_file)])
    assert result.exit_code == 2
    assert result.output == (
        f"{recipe_file}: $.model.revision: cannot resolve 'main' of model owner/model to a commit "
        "(ConnectionError: no route to huggingface.co); run `recipe lock` with network access, "
        "or set model.revision to a commit hash\n"
    )
    assert not lock_path(recipe_file).exists()


def test_a_commit_hash_needs_no_network() -> None:
    assert hub_commit("model", "owner/model", COMMIT_A) == COMMIT_A


def test_two_clones_of_a_locked_recipe_plan_identical_fingerprints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = clone(tmp_path / "alice")
    second = clone(tmp_path / "bob" / "work" / "checkout")
    shutil.copy(lock(first), lock_path(second))  # the lock travels with the recipe
    plans = []
    for recipe_file in (first, second):
        monkeypatch.chdir(recipe_file.parent.parent)
        recipe = apply_lock(load_recipe(recipe_file), recipe_file)  # no drift in either clone
        plans.append(compute_plan(recipe))
    assert [st.fingerprint for st in plans[0]] == [st.fingerprint for st in plans[1]]
    for plan in plans:
        parts = json.dumps([[st.params, st.inputs] for st in plan])
        assert str(tmp_path) not in parts  # no absolute path feeds a fingerprint


def test_lock_imports_no_torch(tiny: Path) -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from runner.cli import cli\n"
        "r = CliRunner().invoke(cli, ['lock', sys.argv[1]])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tiny)], check=True)

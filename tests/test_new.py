"""`recipe new`: a commented, self-contained starter (NAME.toml and the folder NAME/ it reads:
templates, a copy of a demo set, a schema copy) that validates and plans as written, with paths
relative to itself, the shipped recipes' settings, and nothing ever overwritten."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.data.templates import Renderer, template_sources
from runner.models import resolve
from runner.plan import compute_plan
from runner.recipe import flatten, load_recipe
from runner.recipe.starters import STARTERS

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "recipe.schema.json"
# the shipped recipe each starter carries the settings of
SHIPPED = {
    "adgen-tiny": "adgen-tiny.toml",
    "chat": "chat-tiny.toml",
    "alpaca": "alpaca-tiny.toml",
}
DATA = {"adgen-tiny": "adgen-demo", "chat": "chat-demo", "alpaca": "alpaca-demo"}
# keys that name where a file is (relative to each recipe, so they differ) or the run's name
PLACES = {
    "recipe.name",
    "dataset.path",
    "model.tiny.corpus",
    "template.prompt_file",
    "template.response_file",
}
PATH_VALUE = re.compile(r'^(path|corpus|prompt_file|response_file) = "([^"]*)"', re.M)


def new(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["new", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("starter", STARTERS)
def test_starter_validates_and_plans_as_written(tmp_path: Path, starter: str) -> None:
    code, out = new("my-run", "--from", starter, "--dir", str(tmp_path))
    assert code == 0, out
    recipe_file = tmp_path / "my-run.toml"
    written = [Path(line.removeprefix("wrote ")) for line in out.splitlines()]
    assert written[:2] == [recipe_file, tmp_path / "my-run" / "recipe.schema.json"]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(written)
    check = CliRunner().invoke(cli, ["validate", str(recipe_file)])
    assert check.exit_code == 0, check.output
    text = recipe_file.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "#:schema my-run/recipe.schema.json"
    assert (tmp_path / "my-run" / "recipe.schema.json").read_bytes() == SCHEMA.read_bytes()
    assert sum(line.lstrip().startswith("#") or " # " in line for line in lines) > 20  # commented
    recipe = load_recipe(recipe_file)
    assert recipe.name == "my-run"
    plan = compute_plan(recipe)  # adgen's hub model and data are named, not fetched
    assert {st.status for st in plan} == {"pending"}


@pytest.mark.parametrize("starter", STARTERS)
def test_paths_are_relative_to_the_recipe_and_inside_its_folder(
    tmp_path: Path, starter: str
) -> None:
    """Committable: no absolute path, nothing outside NAME/; the pair moved elsewhere still
    validates (with no --allow-path: every file is under the recipe's root)."""
    assert new("mine", "--from", starter, "--dir", str(tmp_path / "a"))[0] == 0
    text = (tmp_path / "a" / "mine.toml").read_text(encoding="utf-8")
    named = [value for _, value in PATH_VALUE.findall(text)]
    local = [v for v in named if v != "train" and not v.startswith("HasturOfficial/")]
    assert local and all(v.startswith("mine/") and ".." not in v for v in local), named
    assert str(ROOT) not in text and str(tmp_path) not in text
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    for name in ("mine.toml", "mine"):
        shutil.move(tmp_path / "a" / name, moved / name)
    shutil.rmtree(tmp_path / "a")
    check = CliRunner().invoke(cli, ["validate", str(moved / "mine.toml")])
    assert check.exit_code == 0, check.output
    assert {st.status for st in compute_plan(load_recipe(moved / "mine.toml"))} == {"pending"}


@pytest.mark.parametrize("starter", sorted(SHIPPED))
def test_tiny_starters_carry_the_shipped_recipes_settings_and_model(
    tmp_path: Path, starter: str
) -> None:
    """Everything but the places of files equals the shipped recipe's, the copied demo data is
    byte-identical, and the tiny model (its identity: settings and training-text contents) is
    the same one: a starter never silently builds a second tiny model."""
    assert new("s", "--from", starter, "--dir", str(tmp_path))[0] == 0
    mine = load_recipe(tmp_path / "s.toml")
    shipped = load_recipe(ROOT / "recipes" / SHIPPED[starter])
    ours = {k: v for k, v in flatten(mine.data).items() if k not in PLACES}
    theirs = {k: v for k, v in flatten(shipped.data).items() if k not in PLACES}
    assert ours == theirs
    assert mine.get("model.tiny.corpus") == "train" or starter == "adgen-tiny"
    for f in (tmp_path / "s" / "data").iterdir():
        assert f.read_bytes() == (ROOT / "data" / DATA[starter] / f.name).read_bytes()
    assert resolve.model_identity(mine) == resolve.model_identity(shipped)
    assert resolve.tokenizer_identity(mine) == resolve.tokenizer_identity(shipped)


@pytest.mark.parametrize("starter", ["adgen", "adgen-tiny"])
def test_adgen_starters_use_the_shipped_templates(tmp_path: Path, starter: str) -> None:
    assert new("x", "--from", starter, "--dir", str(tmp_path))[0] == 0
    for part in ("prompt", "response"):
        assert (tmp_path / "x" / f"{part}.j2").read_bytes() == (
            ROOT / "templates" / f"adgen_{part}.j2"
        ).read_bytes()
    recipe = load_recipe(tmp_path / "x.toml")
    row = {"content": "类型#裙*颜色#红色", "summary": "红色的裙子"}
    expected = Renderer(template_sources(load_recipe(ROOT / "recipes" / "adgen.toml"))).render(
        row, 0
    )
    assert Renderer(template_sources(recipe)).render(row, 0) == expected


def test_default_starter_is_adgen(tmp_path: Path) -> None:
    code, out = new("x", "--dir", str(tmp_path))
    assert code == 0, out
    assert load_recipe(tmp_path / "x.toml").get("model.name_or_path") == "THUDM/chatglm3-6b"


@pytest.mark.parametrize(
    ("existing", "shown"),
    [
        (["x.toml"], "{t}/x.toml: already exists"),
        (["x/"], "{t}/x: already exists"),
        (["x.toml", "x/"], "{t}/x.toml and {t}/x: already exist"),
    ],
)
def test_never_overwrites(tmp_path: Path, existing: list[str], shown: str) -> None:
    for name in existing:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "mine.txt").write_text("mine")
        else:
            (tmp_path / name).write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out = new("x", "--from", "chat", "--dir", str(tmp_path))
    assert code == 2
    assert out == (
        shown.format(t=tmp_path) + "; recipe new never overwrites: "
        "choose another NAME or --dir, or move it away\n"
    )
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_failed_copy_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.recipe import starters

    def full_disk(source: Path, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(starters.shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match="No space left"):
        starters.new_recipe("x", "chat", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_name(tmp_path: Path) -> None:
    code, out = new("my run", "--dir", str(tmp_path))
    assert code == 2
    assert out == (
        "recipe new my run: a recipe name is letters, digits, '.', '_' and "
        "'-', starting with a letter or digit; e.g. recipe new my-adgen\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_unknown_starter(tmp_path: Path) -> None:
    code, out = new("x", "--from", "sharegpt", "--dir", str(tmp_path))
    assert code == 2
    assert "'sharegpt' is not one of 'adgen', 'adgen-tiny', 'chat', 'alpaca'" in out
    assert list(tmp_path.iterdir()) == []


def test_editors_check_a_starter_with_its_schema_copy(tmp_path: Path) -> None:
    """The `#:schema` line names the copy in NAME/: taplo (what editors run) checks the recipe
    offline, and catches a typo."""
    taplo = shutil.which("taplo") or shutil.which("taplo", path=str(Path(sys.executable).parent))
    if not taplo:
        pytest.skip("taplo is not installed (pip install taplo, part of the dev extra)")
    assert new("t", "--from", "alpaca", "--dir", str(tmp_path / "elsewhere"))[0] == 0

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [taplo, "check", "t.toml"],
            cwd=tmp_path / "elsewhere",
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert check().returncode == 0, check().stderr
    recipe = tmp_path / "elsewhere" / "t.toml"
    recipe.write_text(recipe.read_text().replace("max_steps =", "max_stepz ="))
    bad = check()
    assert bad.returncode != 0 and "max_stepz" in bad.stdout + bad.stderr


# A small version of the chat starter's run: a narrower tiny model pre-trained briefly (a tiny
# model on the recipe's own texts is a build per data set and settings: kept small here, built
# once per session cache), few steps, two held-out conversations. The full-size run
# (`recipe new mychat --from chat && recipe run mychat.toml`, about 3 minutes) is measured by
# hand: see README.
SMALL_RUN = (
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
    "model.tiny.vocab_size=600",
    "model.tiny.pretrain_steps=40",
    "train.max_steps=30",
    "train.save_steps=30",
    "compare.num_examples=2",
    "compare.max_new_tokens=16",
)


@pytest.mark.slow
def test_the_chat_starter_runs_end_to_end_and_writes_words(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("torch")
    from datakit import run_env

    assert new("mychat", "--from", "chat", "--dir", str(tmp_path))[0] == 0
    sets = [
        a for kv in (*SMALL_RUN, f"recipe.output_dir={tmp_path / 'run'}") for a in ("--set", kv)
    ]
    with run_env(tmp_path_factory):
        done = CliRunner().invoke(cli, ["run", str(tmp_path / "mychat.toml"), *sets])
    assert done.exit_code == 0, done.output
    assert "generations before / after fine-tuning" in done.output
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "compare.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(rows) == 2 and all(r["prompt"] and r["reference"] for r in rows)
    vocabulary = set(
        re.findall(r"[a-z]+", (tmp_path / "mychat" / "data" / "train.jsonl").read_text().lower())
    )
    for r in rows:  # the tiny model writes the data's words, not fragments
        words = re.findall(r"[A-Za-z]+", r["after"])
        assert words and sum(w.lower() in vocabulary for w in words) >= len(words) / 2, r

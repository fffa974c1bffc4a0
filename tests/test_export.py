"""Portable exports without torch: the base named as the user knows it, and an exported
recipe.toml that validates and plans from the export folder (its files copied under inputs/).
The export end to end (adapter_config.json, the model card) is in test_use_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from datakit import write_jsonl, write_recipe

from runner.errors import RecipeError
from runner.portable import Base, base_model, portable_recipe, write_portable_recipe
from runner.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> tuple[int, str]:
    from runner.cli import cli as main

    done = CliRunner().invoke(main, list(args))
    return done.exit_code, done.output


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def validate_and_plan(out: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The export, from its own folder: it validates and plans; the plan's output."""
    monkeypatch.chdir(out)
    assert cli("validate", "recipe.toml") == (0, "recipe.toml: ok\n")
    code, plan = cli("plan", "recipe.toml")
    assert code == 0, plan
    return plan


def export_recipe(recipe_file: Path, out: Path, *sets: str, allow: tuple[str, ...] = ()) -> str:
    out.mkdir(parents=True)
    recipe = load_recipe(recipe_file, sets, allow=allow)
    write_portable_recipe(recipe, out, portable_recipe(recipe, out))
    return (out / "recipe.toml").read_text(encoding="utf-8")


def test_a_chat_recipe_on_its_own_texts_runs_again_from_its_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """corpus = "train" names no file: nothing to copy, and the export keeps it as it is."""
    out = tmp_path / "export"
    text = export_recipe(ROOT / "recipes" / "chat-tiny.toml", out)
    assert 'corpus = "train"' in text
    assert files(out) == [
        "inputs/data/chat-demo/dev.jsonl",
        "inputs/data/chat-demo/train.jsonl",
        "recipe.toml",
    ]
    validate_and_plan(out, monkeypatch)


def test_the_shipped_tiny_recipe_runs_again_from_its_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "export"
    text = export_recipe(
        ROOT / "recipes" / "adgen-tiny.toml", out, f"recipe.output_dir={tmp_path / 'run'}"
    )
    assert str(tmp_path) not in text and str(ROOT) not in text  # no machine's paths
    assert "output_dir" not in text.split("\n[")[1]  # the [recipe] table
    assert "# Left out (they name the machine that ran it; set them with --set): " in text
    assert 'corpus = "./inputs/data/adgen-demo/pretrain.jsonl"' in text
    assert 'path = "./inputs/data/adgen-demo"' in text
    assert 'prompt_file = "./inputs/templates/adgen_prompt.j2"' in text
    assert files(out) == [
        "inputs/data/adgen-demo/dev.jsonl",  # only the files the loader reads (no README.md)
        "inputs/data/adgen-demo/pretrain.jsonl",
        "inputs/data/adgen-demo/train.jsonl",
        "inputs/templates/adgen_prompt.j2",
        "inputs/templates/adgen_response.j2",
        "recipe.toml",
    ]
    plan = validate_and_plan(out, monkeypatch)
    assert f"run dir {out.resolve() / 'runs' / 'adgen-tiny'}" in plan
    # the same built-in model: the tiny model is keyed by its settings and corpus content
    original = load_recipe(ROOT / "recipes" / "adgen-tiny.toml")
    exported = load_recipe(out / "recipe.toml")
    from runner.models.resolve import model_identity

    assert model_identity(exported) == model_identity(original)
    assert exported.section("compare") == original.section("compare")


def test_globs_files_outside_the_root_and_a_local_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)  # the recipe root
    write_jsonl(project / "data" / "part-1.jsonl", [{"q": "a", "a": "b"}])
    write_jsonl(project / "data" / "sub" / "part-2.jsonl", [{"q": "c", "a": "d"}])
    (project / "data" / "notes.txt").write_text("not data")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "prompt.j2").write_text("Q: {{ q }}\nA: ")
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    recipe = write_recipe(
        project,
        tokenizer=False,
        model={"name_or_path": str(model)},
        dataset={"path": "data/**/*.jsonl", "heldout_split": None, "heldout_rows": 1},
        template={"prompt": None, "prompt_file": str(shared / "prompt.j2")},
        launch={"main_process_ip": "10.0.0.1", "main_process_port": 29500},
    )
    out = project / "exports" / "one"
    allow = (str(shared), str(model))
    text = export_recipe(recipe, out, allow=allow)
    data = load_recipe(out / "recipe.toml", allow=allow).written
    assert data["dataset"]["path"] == "./inputs/data/**/*.jsonl"
    assert data["template"]["prompt_file"] == "./inputs/external/prompt.j2"
    assert data["model"]["name_or_path"] == "../../../models/base"  # relative to the export
    assert "tiny" not in data["model"]  # only the built-in model reads it
    assert "launch" not in data or "main_process_ip" not in data["launch"]
    assert "recipe.output_dir, launch.main_process_ip, launch.main_process_port" in text
    assert (out / "inputs" / "data" / "sub" / "part-2.jsonl").is_file()
    assert not (out / "inputs" / "data" / "notes.txt").exists()
    monkeypatch.chdir(out)
    assert cli("validate", "recipe.toml", "--allow-path", str(model)) == (0, "recipe.toml: ok\n")
    # without the person's permission the base folder outside the root is refused, as always
    code, output = cli("validate", "recipe.toml")
    assert code == 2 and "outside the recipe root" in output


def test_the_base_as_the_user_knows_it(tmp_path: Path) -> None:
    hub = write_recipe(
        tmp_path / "hub", tokenizer=False, model={"name_or_path": "owner/model", "revision": "v1"}
    )
    assert base_model(load_recipe(hub), tmp_path / "out") == Base("owner/model", "hub", "v1")
    tiny = write_recipe(
        tmp_path / "tiny", tokenizer=False, model={"name_or_path": "builtin:tiny-glm"}
    )
    (tmp_path / "tiny" / "corpus.jsonl").write_text(json.dumps({"text": "t"}) + "\n")
    assert base_model(load_recipe(tiny), tmp_path) == Base("builtin:tiny-glm", "builtin")
    (tmp_path / "loc" / "tok").mkdir(parents=True)
    local = write_recipe(tmp_path / "loc", tokenizer=False)
    assert base_model(load_recipe(local), tmp_path / "loc" / "exports" / "a") == Base(
        "../../tok", "local"
    )


def test_a_link_out_of_the_root_is_not_exported(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    recipe = write_recipe(project, tokenizer=False, model={"name_or_path": "owner/model"})
    secret = tmp_path / "secret.jsonl"
    write_jsonl(secret, [{"q": "key", "a": "value"}])
    (project / "data" / "more.jsonl").symlink_to(secret)
    with pytest.raises(RecipeError, match=r"\$\.dataset\.path: .*outside the recipe root"):
        export_recipe(recipe, tmp_path / "out")


def test_a_missing_template_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "p.j2").write_text("Q: {{ q }}")
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        model={"name_or_path": "owner/model"},
        template={"prompt": None, "prompt_file": "p.j2"},
    )
    loaded = load_recipe(recipe)
    (tmp_path / "p.j2").unlink()
    with pytest.raises(RecipeError) as e:
        portable_recipe(loaded, tmp_path / "out")
    assert str(e.value) == (
        f"{recipe}: $.template.prompt_file: {tmp_path / 'p.j2'} not found; the exported "
        "recipe needs it: restore it, or export from a checkout that has it"
    )


def test_the_card_and_adapter_config_name_a_hub_base_with_its_revision(tmp_path: Path) -> None:
    from runner.export import _name_the_base, model_card

    recipe = load_recipe(
        write_recipe(
            tmp_path, tokenizer=False, model={"name_or_path": "owner/model", "revision": "v1"}
        )
    )
    out = tmp_path / "out"
    card = model_card(recipe, merged=False, out=out, data_path="./inputs/data")
    assert "\nbase_model: owner/model\n" in card  # the hub's metadata
    assert "- base model: `owner/model` on the Hugging Face hub (revision `v1`)" in card
    assert "- data: `./inputs/data`, split `train`, held out `dev`" in card
    assert 'base = AutoModelForCausalLM.from_pretrained("owner/model", revision="v1")' in card
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": "/cache/models/x", "r": 8}))
    _name_the_base(config, base_model(recipe, out))
    assert json.loads(config.read_text()) == {
        "base_model_name_or_path": "owner/model",
        "r": 8,
        "revision": "v1",
    }

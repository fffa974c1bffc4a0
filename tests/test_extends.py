"""`extends`: deep merge (child wins), paths relative to the file that wrote them, cycles and
missing parents named with the chain, errors naming the file a bad value came from; --set on
top of the merged recipe; `recipe show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.data.sources import dataset_identity
from runner.errors import RecipeError
from runner.plan import compute_plan
from runner.recipe import load_recipe

BASE = """\
[recipe]
name = "base"
seed = 7
output_dir = "{run_dir}"

[model]
name_or_path = "builtin:tiny-glm"

[model.tiny]
corpus = "corpus.jsonl"
hidden_size = 128

[dataset]
path = "data"
heldout_split = "dev"

[template]
prompt_file = "prompt.j2"
response = "{{{{ a }}}}"

[lora]
r = {rank}
target_modules = ["q_proj", "v_proj"]

[train]
learning_rate = 1e-3
max_steps = 10
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def work_tree(tmp_path: Path) -> None:
    """tmp is a git work tree, the recipe root: team/ recipes may extend ../shared."""
    (tmp_path / ".git").mkdir()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """tmp/shared/base.toml with its corpus, data and template next to it."""
    folder = tmp_path / "shared"
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(20)]
    write(folder / "data" / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:16]))
    write(folder / "data" / "dev.jsonl", "".join(json.dumps(r) + "\n" for r in rows[16:]))
    write(folder / "corpus.jsonl", json.dumps({"text": "some text"}) + "\n")
    write(folder / "prompt.j2", "Q: {{ q }}\nA: ")
    return write(folder / "base.toml", BASE.format(run_dir=tmp_path / "run", rank=8))


def child(tmp_path: Path, text: str, name: str = "team/child.toml") -> Path:
    return write(tmp_path / name, text)


def test_child_wins_tables_merge_key_by_key_lists_are_replaced(
    tmp_path: Path, shared: Path
) -> None:
    f = child(
        tmp_path,
        'extends = "../shared/base.toml"\n[recipe]\nname = "child"\n'
        '[lora]\nr = 16\ntarget_modules = ["c_attn"]\n[train]\nmax_steps = 20\n',
    )
    r = load_recipe(f)
    assert r.name == "child"
    assert r.seed == 7  # from the parent
    assert r.get("lora.r") == 16
    assert r.get("lora.target_modules") == ["c_attn"]  # replaced whole, not appended
    assert r.get("train.max_steps") == 20
    assert r.get("train.learning_rate") == 1e-3  # the parent's, kept beside the child's key
    assert r.get("model.tiny.hidden_size") == 128
    assert r.files == (f.resolve(), shared.resolve())


def test_parent_paths_are_relative_to_the_parent(tmp_path: Path, shared: Path) -> None:
    f = child(tmp_path, 'extends = "../shared/base.toml"\n[recipe]\nname = "child"\n')
    r = load_recipe(f)
    assert r.get("dataset.path") == "../shared/data"
    assert r.get("model.tiny.corpus") == "../shared/corpus.jsonl"
    assert r.get("template.prompt_file") == "../shared/prompt.j2"
    assert r.resolve(r.get("template.prompt_file")) == (shared.parent / "prompt.j2").resolve()
    assert dataset_identity(r)["files"].keys() == {
        "../shared/data/dev.jsonl",
        "../shared/data/train.jsonl",
    }
    assert {st.status for st in compute_plan(r)} == {"pending"}


def test_child_paths_are_relative_to_the_child(tmp_path: Path, shared: Path) -> None:
    write(tmp_path / "team" / "mine.j2", "Question: {{ q }}")
    f = child(tmp_path, 'extends = "../shared/base.toml"\n[template]\nprompt_file = "mine.j2"\n')
    assert load_recipe(f).get("template.prompt_file") == "mine.j2"


def test_hub_ids_in_a_parent_stay_hub_ids(tmp_path: Path) -> None:
    write(
        tmp_path / "shared" / "hub.toml",
        '[recipe]\nname = "hub"\n[model]\nname_or_path = "owner/model"\n'
        '[dataset]\npath = "owner/data"\n[template]\nprompt = "{{ q }}"\nresponse = "{{ a }}"\n',
    )
    f = child(tmp_path, 'extends = "../shared/hub.toml"\n')
    r = load_recipe(f)
    assert (r.get("model.name_or_path"), r.get("dataset.path")) == ("owner/model", "owner/data")


def test_several_parents_merge_in_order_later_wins(tmp_path: Path, shared: Path) -> None:
    write(tmp_path / "team" / "small.toml", "[lora]\nr = 4\nlora_alpha = 8\n")
    write(tmp_path / "team" / "fast.toml", "[lora]\nr = 2\n[train]\nmax_steps = 3\n")
    f = child(tmp_path, 'extends = ["../shared/base.toml", "small.toml", "fast.toml"]\n')
    r = load_recipe(f)
    assert (r.get("lora.r"), r.get("lora.lora_alpha"), r.get("train.max_steps")) == (2, 8, 3)


def test_chain_of_three(tmp_path: Path, shared: Path) -> None:
    child(tmp_path, 'extends = "../shared/base.toml"\n[lora]\nr = 4\n', "team/mid.toml")
    f = child(tmp_path, 'extends = "team/mid.toml"\n[recipe]\nname = "top"\n', "top.toml")
    r = load_recipe(f)
    assert (r.name, r.get("lora.r"), r.get("dataset.path")) == ("top", 4, "./shared/data")


def test_inline_prompt_in_child_replaces_parent_prompt_file(tmp_path: Path, shared: Path) -> None:
    f = child(tmp_path, 'extends = "../shared/base.toml"\n[template]\nprompt = "{{ q }} ->"\n')
    assert load_recipe(f).written["template"] == {"prompt": "{{ q }} ->", "response": "{{ a }}"}


def test_switching_to_another_model_drops_the_parents_tiny_settings(
    tmp_path: Path, shared: Path
) -> None:
    f = child(tmp_path, 'extends = "../shared/base.toml"\n[model]\nname_or_path = "owner/m"\n')
    r = load_recipe(f)
    assert "tiny" not in r.written["model"]


def test_bad_value_is_reported_in_the_parent_with_its_line(tmp_path: Path) -> None:
    base = write(tmp_path / "shared" / "base.toml", BASE.format(run_dir=tmp_path / "run", rank=0))
    f = child(tmp_path, 'extends = "../shared/base.toml"\n\n[lora]\nlora_alhpa = 8\n')
    result = CliRunner().invoke(cli, ["validate", str(f)])
    assert result.exit_code == 2
    assert result.output == (
        f"{f}:4: $.lora.lora_alhpa: unknown key 'lora_alhpa'; did you mean 'lora_alpha'?\n"
        f"{base}:22: $.lora.r: 0 is less than the minimum of 1\n"
    )


def test_child_value_overriding_a_bad_parent_value_is_fine(tmp_path: Path) -> None:
    write(tmp_path / "shared" / "base.toml", BASE.format(run_dir=tmp_path / "run", rank=0))
    write(tmp_path / "shared" / "corpus.jsonl", "")
    f = child(tmp_path, 'extends = "../shared/base.toml"\n[lora]\nr = 8\n')
    assert load_recipe(f).get("lora.r") == 8


def test_cycle_is_reported_with_the_chain(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    b = write(tmp_path / "b.toml", '# b\nextends = "a.toml"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(a)
    assert e.value.lines == [
        f"{b}:2: $.extends: cycle: {a} -> {b} -> {a}; remove one of these extends"
    ]


def test_extending_itself_is_a_cycle(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'extends = "./a.toml"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(a)
    assert e.value.lines == [f"{a}:1: $.extends: cycle: {a} -> {a}; remove one of these extends"]


def test_missing_parent(tmp_path: Path) -> None:
    f = child(tmp_path, '# a child\nextends = "../nope/base.toml"\n[recipe]\nname = "x"\n')
    result = CliRunner().invoke(cli, ["validate", str(f)])
    assert result.exit_code == 2
    assert result.output == (
        f"{f}:2: $.extends: '../nope/base.toml' not found "
        f"(looked for {tmp_path / 'nope' / 'base.toml'}); "
        f"the path is relative to {f}\n"
    )


def test_extends_must_be_a_file_name_or_a_list_of_them(tmp_path: Path) -> None:
    f = child(tmp_path, "extends = 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert e.value.lines == [
        f"{f}:1: $.extends: 3 is not a file name or a list of file names; "
        'write extends = "base.toml" or extends = ["a.toml", "b.toml"]'
    ]


def test_broken_parent_toml_names_the_parent(tmp_path: Path) -> None:
    base = write(tmp_path / "base.toml", "[lora\n")
    f = child(tmp_path, 'extends = "../base.toml"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert e.value.lines[0].startswith(f"{base}:1: invalid TOML: ")


def test_missing_parent_file_at_run_time_names_the_parent(tmp_path: Path, shared: Path) -> None:
    (shared.parent / "corpus.jsonl").unlink()
    f = child(tmp_path, 'extends = "../shared/base.toml"\n')
    with pytest.raises(RecipeError) as e:
        compute_plan(load_recipe(f))
    assert e.value.lines == [
        f"{shared.resolve()}: $.model.tiny.corpus: "
        f"{(shared.parent / 'corpus.jsonl').resolve()} not found; "
        "point it at a JSON-lines file with a `text` field "
        '(or corpus = "train": the recipe\'s own training texts)'
    ]


def test_set_applies_on_top_of_the_merged_recipe(tmp_path: Path, shared: Path) -> None:
    f = child(tmp_path, 'extends = "../shared/base.toml"\n[lora]\nr = 16\n')
    assert load_recipe(f, ["lora.r=32"]).get("lora.r") == 32


def test_extends_cannot_be_set_on_the_command_line(small_recipe: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(small_recipe), "--set", "extends=x.toml"])
    assert result.exit_code == 2
    assert result.output == (
        "--set extends=x.toml: extends cannot be set on the command line; "
        "write it in the recipe file\n"
    )


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ('dataset.columns={question = "q"}', "dataset.columns", {"question": "q"}),  # table
        ("model.revision=0123abc", "model.revision", "0123abc"),  # string or null
        ("model.revision=1234", "model.revision", "1234"),  # digits, still a string
        ("dataset.max_rows=10", "dataset.max_rows", 10),  # integer or null
        ("lora.layers_to_transform=[0, 2]", "lora.layers_to_transform", [0, 2]),  # array or null
        ("lora.lora_alpha=16", "lora.lora_alpha", 16),  # number given as an integer
        ("lora.lora_dropout=0.1", "lora.lora_dropout", 0.1),  # number
        ("train.bf16=false", "train.bf16", False),  # the boolean branch of boolean | "auto"
        ('compare.prompts=[{q = "hi"}]', "compare.prompts", [{"q": "hi"}]),  # array of tables
        ("tokenize.truncation=drop", "tokenize.truncation", "drop"),  # enum, bare word
    ],
)
def test_set_overrides_of_each_type(small_recipe: Path, item: str, key: str, value: object) -> None:
    assert load_recipe(small_recipe, [item]).get(key) == value


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("dataset.max_rows=ten", "$.dataset.max_rows: 'ten' is not of type 'integer', 'null'"),
        ("dataset.columns=3", "$.dataset.columns: 3 is not of type 'object'"),
        (
            "train.bf16=maybe",
            "$.train.bf16: 'maybe' is not one of 'auto' (expected boolean or 'auto')",
        ),
        (
            "lora.layers_to_transform=[-1]",
            "$.lora.layers_to_transform[0]: -1 is less than the minimum of 0",
        ),
    ],
)
def test_set_overrides_are_validated_by_type(small_recipe: Path, item: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["validate", str(small_recipe), "--set", item])
    assert result.exit_code == 2
    assert result.output == f"--set {item}: {message}\n"


def test_show_prints_the_resolved_recipe(tmp_path: Path, shared: Path) -> None:
    f = child(tmp_path, 'extends = "../shared/base.toml"\n[lora]\nr = 16\n')
    result = CliRunner().invoke(cli, ["show", str(f), "--set", "lora.lora_alpha=64"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == [
        f"# {f.resolve()} resolved (defaults and overrides applied)",
        f"# extends: {shared.resolve()}",
        "# --set lora.lora_alpha=64",
    ]
    assert {"r = 16", "lora_alpha = 64", 'optim = "paged_adamw_8bit"'} <= set(lines)
    assert "extends" not in "\n".join(lines[3:])
    # the printed recipe stands alone: loaded from the child's folder it is the same recipe
    again = write(f.parent / "resolved.toml", result.output)
    assert load_recipe(again).data == load_recipe(f, ["lora.lora_alpha=64"]).data


def test_show_reports_errors_like_validate(small_recipe: Path) -> None:
    result = CliRunner().invoke(cli, ["show", str(small_recipe), "--set", "lora.r=0"])
    assert result.exit_code == 2
    assert result.output == "--set lora.r=0: $.lora.r: 0 is less than the minimum of 1\n"


def test_run_writes_the_resolved_recipe(tmp_path: Path, shared: Path) -> None:
    from runner.run import write_resolved_recipe

    r = load_recipe(child(tmp_path, 'extends = "../shared/base.toml"\n'))
    write_resolved_recipe(r)
    assert (r.run_dir / "recipe.resolved.toml").read_text(encoding="utf-8") == r.to_toml()


def test_a_path_from_set_is_relative_to_the_recipe(tmp_path: Path, shared: Path) -> None:
    f = child(tmp_path, 'extends = "../shared/base.toml"\n')
    with pytest.raises(RecipeError) as e:
        compute_plan(load_recipe(f, ["dataset.path=./nope"]))
    assert e.value.lines[0].startswith(
        f"{f.resolve()}: $.dataset.path: {(f.parent / 'nope').resolve()} not found; "
    )

"""`recipe generate`, `recipe chat` and `recipe export` without a model: the command-line
contract (exit 2 with one clear line) and the chat loop on a stand-in model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.recipe import load_recipe
from runner.use import chat_loop, prompt_from_row, template_variables

NO_ADAPTER = "run/adapter: no trained adapter yet; run `recipe run recipe.toml` first"
BASE_HINT = " (or pass --base for the base model alone)"


@pytest.fixture
def in_tmp(small_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The small recipe, with the current directory where it lives (short paths in messages)."""
    monkeypatch.chdir(small_recipe.parent)
    return small_recipe


def invoke(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (("generate", "recipe.toml", "--prompt", "Q: hi\nA: "), BASE_HINT),
        (("generate", "recipe.toml", "--row", '{"q": "hi"}'), BASE_HINT),
        (("chat", "recipe.toml"), BASE_HINT),
        (("export", "recipe.toml", "--adapter", "out"), ""),
        (("export", "recipe.toml", "--merge", "out"), ""),
    ],
)
def test_no_adapter_yet_is_exit_2_with_the_fix(
    in_tmp: Path, args: tuple[str, ...], hint: str
) -> None:
    code, out, err = invoke(*args, stdin="hello\n")
    assert (code, out, err) == (2, "", NO_ADAPTER + hint + "\n")
    assert not (in_tmp.parent / "out").exists()


def test_generate_needs_exactly_one_of_prompt_and_row(in_tmp: Path) -> None:
    message = (
        "generate: pass exactly one of --prompt TEXT (the raw prompt) or --row JSON "
        "(rendered through the recipe's prompt template)\n"
    )
    assert invoke("generate", "recipe.toml") == (2, "", message)
    assert invoke("generate", "recipe.toml", "--prompt", "x", "--row", "{}") == (2, "", message)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "{q: 1}",
            "--row: not valid JSON (Expecting property name enclosed in double quotes at "
            'column 2); pass an object such as \'{"content": "..."}\'',
        ),
        ('["hi"]', '--row: expected a JSON object such as \'{"content": "..."}\', got list'),
        (
            '{"content": "hi"}',
            "template.prompt: row 0: 'q' is undefined; the row has columns: "
            "content (rename with [dataset.columns])",
        ),
    ],
)
def test_a_bad_row_is_exit_2_before_any_model_loads(in_tmp: Path, row: str, message: str) -> None:
    assert invoke("generate", "recipe.toml", "--row", row) == (2, "", message + "\n")


def test_row_is_rendered_through_the_prompt_template(in_tmp: Path) -> None:
    recipe = load_recipe(in_tmp)
    assert prompt_from_row(recipe, json.dumps({"q": "红色 <b>"})) == "Q: 红色 <b>\nA: "
    assert template_variables(recipe) == ["q"]


def test_export_needs_a_destination(in_tmp: Path) -> None:
    assert invoke("export", "recipe.toml") == (
        2,
        "",
        "export: pass --merge OUT (a merged model) and/or --adapter OUT "
        "(the adapter with a model card) and/or --chatglm-adapter OUT\n",
    )
    assert invoke("export", "recipe.toml", "--merge", "x", "--adapter", "./x") == (
        2,
        "",
        "export: --merge and --adapter both name x; use two folders\n",
    )


def test_export_refuses_a_folder_that_is_not_empty(in_tmp: Path) -> None:
    adapter = in_tmp.parent / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (in_tmp.parent / "busy").mkdir()
    (in_tmp.parent / "busy" / "keep.txt").write_text("mine")
    assert invoke("export", "recipe.toml", "--adapter", "busy") == (
        2,
        "",
        "busy: exists and is not empty; choose a new folder or remove it\n",
    )
    assert invoke("export", "recipe.toml", "--adapter", "run/adapter") == (
        2,
        "",
        "run/adapter: is the run's own adapter folder; export to another folder\n",
    )
    assert (in_tmp.parent / "busy" / "keep.txt").read_text() == "mine"


@dataclass
class EchoModel:
    """Stands in for runner.use.Session: replies with what it was asked."""

    label: str = "echo model"
    asked: list[str] = field(default_factory=list)
    conversations: list[list[str]] = field(default_factory=list)

    def reply(self, prompt: str) -> str:
        self.asked.append(prompt)
        return f"<{len(self.asked)}> {prompt!r}"

    def chat(self, messages: list[dict[str, str]], limit: int) -> tuple[str, int]:
        self.conversations.append([m["content"] for m in messages])
        return self.reply(messages[-1]["content"]), 0


def test_chat_renders_each_line_through_the_template_until_quit(in_tmp: Path) -> None:
    recipe = load_recipe(in_tmp)
    model, said, notes, markers = EchoModel(), [], [], []
    n = chat_loop(
        model,
        recipe,
        iter(["红色\n", "   \n", "blue dress\r\n", "/quit\n", "never\n"]),  # type: ignore[arg-type]
        say=said.append,
        note=notes.append,
        marker=lambda: markers.append(1),
    )
    assert n == 2
    assert model.asked == ["Q: 红色\nA: ", "Q: blue dress\nA: "]
    assert said == ["<1> 'Q: 红色\\nA: '", "<2> 'Q: blue dress\\nA: '"]
    assert notes == [
        "chat with the echo model: each line is the template's `q`; "
        "the conversation is kept (/reset starts over); /exit or Ctrl-D ends"
    ]
    assert len(markers) == 4  # before each line read, until /quit


def test_chat_raw_uses_each_line_as_the_prompt_and_stops_at_eof(in_tmp: Path) -> None:
    model, said, notes = EchoModel(), [], []
    n = chat_loop(
        model,
        load_recipe(in_tmp),
        iter(["plain words\n"]),
        say=said.append,  # type: ignore[arg-type]
        note=notes.append,
        raw=True,
    )
    assert (n, model.asked) == (1, ["plain words"])
    assert notes[0].startswith("chat with the echo model: each line is the whole prompt;")


def test_chat_on_a_conversation_recipe_takes_each_line_as_a_user_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    new = CliRunner().invoke(cli, ["new", "talk", "--from", "chat"])
    assert new.exit_code == 0, new.output
    model, notes = EchoModel(), []
    n = chat_loop(
        model,
        load_recipe(tmp_path / "talk.toml"),
        iter(["hello\n", "and then?\n"]),
        say=lambda _: None,  # type: ignore[arg-type]
        note=notes.append,
    )
    assert n == 2 and model.conversations[-1][-3:] == ["hello", "<1> 'hello'", "and then?"]
    assert notes == [
        "chat with the echo model: each line is a user turn; the conversation is kept "
        "(/reset starts over); /exit or Ctrl-D ends"
    ]

"""Templates: sandboxed Jinja, strict about undefined variables, no files, no environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from datakit import write_recipe

from runner.cli import cli
from runner.data.templates import Renderer, TemplateText
from runner.errors import RecipeError
from runner.recipe import load_recipe

ROW = {"q": "question 0", "a": "answer 0"}


def renderer(prompt: str, response: str = "{{ a }}") -> Renderer:
    return Renderer(
        {
            "prompt": TemplateText("template.prompt", prompt),
            "response": TemplateText("template.response", response),
        }
    )


def render_error(prompt: str) -> str:
    with pytest.raises(RecipeError) as e:
        renderer(prompt).render(ROW, 7, "train row")
    return str(e.value)


def test_renders_prompt_and_response() -> None:
    assert renderer("Q: {{ q }}\nA: ").render(ROW, 1) == ("Q: question 0\nA: ", "answer 0")


def test_missing_variable_names_template_variable_row_and_columns() -> None:
    assert render_error("{{ question }}") == (
        "template.prompt: train row 7: 'question' is undefined; the row has columns: a, q "
        "(rename with [dataset.columns])"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ ''.__class__ }}", "access to attribute '__class__' of 'str' object is unsafe."),
        ("{{ q.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe."),
        (
            "{{ cycler.__init__.__globals__ }}",
            "access to attribute '__init__' of 'type' object is unsafe.",
        ),
        (
            "{{ lipsum.__globals__['os'].environ }}",
            "access to attribute '__globals__' of 'function' object is unsafe.",
        ),
        (
            "{{ self.__dict__ }}",
            "access to attribute '__dict__' of 'TemplateReference' object is unsafe.",
        ),
        ("{% include '/etc/passwd' %}", "templates cannot read files ('/etc/passwd')"),
        ("{% import '/etc/passwd' as p %}", "templates cannot read files ('/etc/passwd')"),
        ("{% extends '/etc/passwd' %}", "templates cannot read files ('/etc/passwd')"),
    ],
)
def test_sandbox_refuses(template: str, message: str) -> None:
    assert (
        render_error(template)
        == f"template.prompt: train row 7: not allowed in a template: {message}"
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ os.environ }}",
        "{{ environ }}",
        "{{ env.SECRET_FOR_TEST }}",
        "{{ lipsum.__globals__.os.environ.SECRET_FOR_TEST }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ config }}",
        "{{ request }}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_environment_variables_are_unreachable(
    template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "s3cr3t-value")
    try:
        out = renderer(template).render_part("prompt", ROW, 1)
    except RecipeError as e:
        out = str(e)
    assert "s3cr3t-value" not in out


def test_other_render_failures_name_the_row() -> None:
    assert (
        render_error("{{ 1 / 0 }}")
        == "template.prompt: train row 7: ZeroDivisionError: division by zero"
    )


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(RecipeError) as e:
        renderer("line one\n{{ q }")
    assert str(e.value).startswith("template.prompt:2: template syntax error: ")


def test_template_files_relative_to_the_recipe(tmp_path: Path) -> None:
    from runner.data.formatting import prepare

    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "p.j2").write_text("Question: {{ q }}\n", encoding="utf-8")
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        template={"prompt": None, "prompt_file": "templates/p.j2"},
        dataset={"shuffle": False},
    )
    out = prepare(load_recipe(recipe))
    assert out.train[0]["prompt"] == "Question: question 0\n"  # its final newline is kept


def test_missing_variable_through_recipe_run(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, dataset={"shuffle": False}, template={"response": "{{ answer }}"}
    )
    result = CliRunner().invoke(cli, ["run", str(recipe), "--until", "format"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        "template.response: train row 1: 'answer' is undefined; the row has columns: a, q "
        "(rename with [dataset.columns])"
    )


def test_sandbox_escape_through_recipe_run(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, template={"prompt": "{% include '/etc/passwd' %}"})
    result = CliRunner().invoke(cli, ["run", str(recipe), "--until", "format"])
    assert result.exit_code == 2, result.output
    assert "root:" not in result.output
    assert result.output.splitlines()[-1].endswith(
        ": not allowed in a template: templates cannot read files ('/etc/passwd')"
    )

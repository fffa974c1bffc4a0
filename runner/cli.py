"""The `recipe` command: click only. Library errors become one-line messages and exit codes:
0 done, 1 a stage failed, 2 the recipe or command line is invalid, 130 interrupted."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from runner import __version__
from runner.errors import Interrupted, RecipeError, StageError

F = TypeVar("F", bound=Callable[..., Any])


class Failure(click.ClickException):
    """A one-line (or one line per problem) message on stderr, no traceback."""

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True)


class InvalidInput(Failure):
    exit_code = 2


class StageFailed(Failure):
    exit_code = 1


class RunInterrupted(Failure):
    exit_code = 130


def reported(func: F) -> F:
    """Turn the runner's exceptions into messages and exit codes at the boundary."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RecipeError as e:
            raise InvalidInput("\n".join(e.lines)) from None
        except StageError as e:
            raise StageFailed(f"error: stage {e.stage} failed: {e.message}") from None
        except Interrupted as e:
            raise RunInterrupted(f"interrupted during {e}; state saved, `recipe run` resumes") from None
        except KeyboardInterrupt:
            raise RunInterrupted("interrupted") from None

    return wrapper  # type: ignore[return-value]


recipe_arg = click.argument("recipe_file", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="Override a recipe key, e.g. --set lora.r=16 (repeatable).")


def _load(recipe_file: Path, overrides: tuple[str, ...]) -> Any:
    from runner.recipe import load_recipe

    return load_recipe(recipe_file, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="recipe")
def cli() -> None:
    """Declarative fine-tuning: a TOML recipe runs as resumable stages
    format -> tokenize -> quantize-load -> train -> save -> compare."""


@cli.command()
@click.argument("recipe_files", metavar="RECIPE...", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@set_opt
@reported
def validate(recipe_files: tuple[Path, ...], overrides: tuple[str, ...]) -> None:
    """Check recipes against the schema; print every problem as FILE:LINE: $.key: message."""
    problems: list[str] = []
    for f in recipe_files:
        try:
            _load(f, overrides)
            click.echo(f"{f}: ok")
        except RecipeError as e:
            problems.extend(e.lines)
    if problems:
        raise RecipeError(problems)


@cli.command()
@recipe_arg
@set_opt
@reported
def plan(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Show each stage as done, stale (why) or pending, without running anything."""
    from runner.plan import compute_plan

    recipe = _load(recipe_file, overrides)
    click.echo(f"recipe {recipe.name}: run dir {recipe.run_dir}")
    for st in compute_plan(recipe):
        why = f" ({'; '.join(st.reasons)})" if st.reasons else ""
        click.echo(f"  {st.name:<14} {st.status:<8} {st.fingerprint}{why}")


@cli.command()
@recipe_arg
@set_opt
@click.option("--force", is_flag=True, help="Reuse a run directory that belongs to another recipe.")
@click.option("--until", "until", type=click.Choice(["format", "tokenize", "quantize-load", "train",
                                                     "save", "compare"]),
              help="Stop after this stage.")
@reported
def run(recipe_file: Path, overrides: tuple[str, ...], force: bool, until: str | None) -> None:
    """Run the stages that are not up to date, then print the before/after table."""
    from runner.run import run_recipe

    recipe = _load(recipe_file, overrides)
    run_recipe(recipe, click.echo, force=force, only=until)
    if until in (None, "compare"):
        _print_compare(recipe.run_dir)


def _print_compare(run_dir: Path) -> None:
    from runner.plan import state_path
    from runner.report.table import print_table

    rows_file = run_dir / "compare.jsonl"
    state_file = state_path(run_dir, "compare")
    if not rows_file.is_file() or not state_file.is_file():
        return
    rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line]
    summary = json.loads(state_file.read_text(encoding="utf-8")).get("metrics", {})
    print_table(rows, summary)
    click.echo(f"compare table: {run_dir / 'compare.md'}")


@cli.command()
@recipe_arg
@set_opt
@reported
def status(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """What ran, when, with which fingerprint, and its metrics."""
    from runner.plan import compute_plan

    recipe = _load(recipe_file, overrides)
    click.echo(f"recipe {recipe.name}: run dir {recipe.run_dir}")
    for st in compute_plan(recipe):
        state = st.state or {}
        when = f"{state.get('started', '-')} .. {state.get('ended') or '-'}"
        click.echo(f"  {st.name:<14} {st.status:<8} last: {state.get('status', 'never ran'):<11} "
                   f"{when}  fingerprint {state.get('fingerprint', '-')}")
        if st.reasons:
            click.echo(f"      why: {'; '.join(st.reasons)}")
        metrics = state.get("metrics") or {}
        if metrics:
            click.echo(f"      metrics: {json.dumps(metrics, ensure_ascii=False, sort_keys=True)[:400]}")


@cli.command()
def schema() -> None:
    """Print the JSON Schema recipes are checked against."""
    from runner.recipe.schema import SCHEMA_PATH

    click.echo(SCHEMA_PATH.read_text(encoding="utf-8"), nl=False)


def main() -> None:
    cli(prog_name="recipe")


if __name__ == "__main__":  # pragma: no cover
    main()

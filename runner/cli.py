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
            raise RunInterrupted(
                f"interrupted during {e}; state saved, `recipe run` resumes"
            ) from None
        except KeyboardInterrupt:
            raise RunInterrupted("interrupted") from None

    return wrapper  # type: ignore[return-value]


recipe_arg = click.argument(
    "recipe_file", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path)
)
set_opt = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key, e.g. --set lora.r=16 (repeatable).",
)

unset_opt = click.option(
    "--unset",
    "unsets",
    multiple=True,
    metavar="KEY",
    help="Remove a key (or a whole table) the recipe or a file it extends sets, before --set "
    "applies, e.g. --unset model.tiny (repeatable).",
)

allow_opt = click.option(
    "--allow-path",
    "allow",
    multiple=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Let the recipe read (and write its run directory) in DIR, outside its root: the git "
    "work tree holding it, or its folder (repeatable; also RECIPE_ALLOW_PATHS).",
)


gpus_opt = click.option(
    "--gpus",
    "gpus",
    type=click.IntRange(min=1),
    metavar="N",
    help="Train in N processes, one per GPU, through accelerate (the same as "
    "--set launch.num_processes=N); the other stages run once.",
)


def with_gpus(overrides: tuple[str, ...], gpus: int | None) -> tuple[str, ...]:
    return overrides if gpus is None else (*overrides, f"launch.num_processes={gpus}")


def _load(
    recipe_file: Path,
    overrides: tuple[str, ...],
    allow: tuple[Path, ...] = (),
    unsets: tuple[str, ...] = (),
    check_files: bool = False,
) -> Any:
    from runner.recipe import load_recipe

    return load_recipe(recipe_file, overrides, allow, unsets, check_files=check_files)


def _load_run(
    recipe_file: Path,
    overrides: tuple[str, ...],
    allow: tuple[Path, ...],
    unsets: tuple[str, ...],
    note: Callable[[str], None],
) -> Any:
    """The recipe as the last `recipe run` in its run directory used it: that run's --set/--unset
    (state/settings.json) first, this command's own on top."""
    from runner.recipe import load_recipe
    from runner.rundir import SETTINGS, followed_settings

    recipe = load_recipe(recipe_file, overrides, allow, unsets)
    followed = followed_settings(recipe.run_dir, overrides, unsets)
    if followed is None:
        return recipe
    sets, dropped, shown = followed
    try:
        recipe = load_recipe(recipe_file, sets, allow, dropped, lenient=True)
    except RecipeError as e:
        raise RecipeError(
            [
                *e.lines,
                f"{recipe.run_dir / SETTINGS}: the last `recipe run` there used {shown}, "
                "which no longer fits the recipe; run it again to replace them",
            ]
        ) from None
    note(f"following the last run in {recipe.run_dir}: {shown}")
    return recipe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="recipe")
def cli() -> None:
    """Declarative fine-tuning: a TOML recipe runs as resumable stages
    format -> tokenize -> quantize-load -> train -> save -> compare."""


@cli.command()
@click.argument(
    "recipe_files",
    metavar="RECIPE...",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
@set_opt
@unset_opt
@allow_opt
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: a list of {file, line, path, message} on stdout, for CI systems.",
)
@reported
def validate(
    recipe_files: tuple[Path, ...],
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
    fmt: str,
) -> None:
    """Check recipes against the schema; print every problem as FILE:LINE: $.key: message.
    Exits 2 when any recipe is invalid, so it works as a pre-commit hook."""
    if fmt == "json":
        from runner.recipe.load import validation_report

        found = validation_report(recipe_files, overrides, allow, unsets)
        click.echo(json.dumps(found, indent=2, ensure_ascii=False))
        if found:
            click.get_current_context().exit(2)
        return
    problems: list[str] = []
    for f in recipe_files:
        try:
            _load(f, overrides, allow, unsets, check_files=True)
            click.echo(f"{f}: ok")
        except RecipeError as e:
            problems.extend(e.lines)
    if problems:
        raise RecipeError(problems)


@cli.command()
@recipe_arg
@set_opt
@unset_opt
@allow_opt
@click.option(
    "--model",
    "model",
    is_flag=True,
    help="Also build the model on the meta device from its config (imports torch, reads "
    "no weights): LoRA targets checked, trainable params, a memory estimate.",
)
@click.option(
    "--gpu-memory",
    "gpu_memory",
    type=click.FloatRange(min=0, min_open=True),
    metavar="GIB",
    help="With --model: estimate for a CUDA GPU with this many GiB free, as if it ran there "
    '(what the "auto" memory settings would choose; train.memory_budget_gib, when set, '
    "comes first). Default: this machine's GPU and its free memory, if it has one.",
)
@gpus_opt
@reported
def plan(
    recipe_file: Path,
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
    model: bool,
    gpu_memory: float | None,
    gpus: int | None,
) -> None:
    """Show each stage as done, stale (why) or pending, without running anything."""
    if gpu_memory is not None and not model:
        raise click.UsageError("--gpu-memory estimates the model's memory: add --model")
    from runner.models.resolve import remote_code_note
    from runner.plan import compute_plan
    from runner.report.data_metrics import mix_plan_lines

    recipe = _load_run(recipe_file, with_gpus(overrides, gpus), allow, unsets, click.echo)
    click.echo(f"recipe {recipe.name}: run dir {recipe.run_dir}")
    for st in compute_plan(recipe):
        why = f" ({'; '.join(st.reasons)})" if st.reasons else ""
        click.echo(f"  {st.name:<14} {st.status:<8} {st.fingerprint}{why}")
        sources = recipe.section("dataset").get("sources")
        if st.name == "format" and sources:  # a mix: what each source gives (or asks for)
            metrics = (st.state or {}).get("metrics") if st.status == "done" else None
            for line in mix_plan_lines(sources, metrics):
                click.echo(f"      {line}")
    note = remote_code_note(recipe)
    if note:
        click.echo(note)
    if model:
        from runner.models.estimate import format_model_plan, plan_for
        from runner.quiet import quiet_libraries

        quiet_libraries()
        for line in format_model_plan(plan_for(recipe, gpu_memory)):
            click.echo(line)


@cli.command()
@recipe_arg
@set_opt
@unset_opt
@allow_opt
@click.option("--force", is_flag=True, help="Reuse a run directory that belongs to another recipe.")
@click.option(
    "--locked",
    is_flag=True,
    help="Refuse to run when the model, data, templates or library versions "
    "differ from RECIPE.lock.",
)
@click.option(
    "--until",
    "until",
    type=click.Choice(["format", "tokenize", "quantize-load", "train", "save", "compare"]),
    help="Stop after this stage.",
)
@gpus_opt
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="Let an unexpected error in a stage end with its Python traceback (it is always "
    "written to logs/<stage>.error.log); also RECIPE_TRACEBACK=1.",
)
@reported
def run(
    recipe_file: Path,
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
    force: bool,
    locked: bool,
    until: str | None,
    gpus: int | None,
    show_traceback: bool,
) -> None:
    """Run the stages that are not up to date, then print the before/after table."""
    from runner.run import run_recipe

    recipe = _load(recipe_file, with_gpus(overrides, gpus), allow, unsets)
    if locked:
        recipe = _locked(recipe, recipe_file)
    run_recipe(recipe, click.echo, force=force, only=until, reraise=show_traceback)
    if until in (None, "compare"):
        _print_compare(recipe.run_dir)


def _locked(recipe: Any, recipe_file: Path) -> Any:
    from runner.lockfile import apply_lock, lock_path

    recipe = apply_lock(recipe, recipe_file)
    click.echo(f"{lock_path(recipe_file)}: nothing drifted")
    return recipe


def _print_compare(run_dir: Path) -> None:
    from runner.report.table import print_table
    from runner.rundir import COMPARE_ROWS, COMPARE_TABLE, REPORT, state_metrics, state_path

    rows_file = run_dir / COMPARE_ROWS
    state_file = state_path(run_dir, "compare")
    if not rows_file.is_file() or not state_file.is_file():
        return
    rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line]
    summary = state_metrics(state_file)
    print_table(rows, summary)
    click.echo(f"compare table: {run_dir / COMPARE_TABLE}")
    if (run_dir / REPORT).is_file():
        click.echo(f"report: {run_dir / REPORT}")


@cli.command()
@recipe_arg
@set_opt
@unset_opt
@allow_opt
@gpus_opt
@reported
def status(
    recipe_file: Path,
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
    gpus: int | None,
) -> None:
    """What ran, when, with which fingerprint, and its metrics."""
    from runner.plan import compute_plan
    from runner.report.data_metrics import metric_lines

    recipe = _load_run(recipe_file, with_gpus(overrides, gpus), allow, unsets, click.echo)
    click.echo(f"recipe {recipe.name}: run dir {recipe.run_dir}")
    for st in compute_plan(recipe):
        state = st.state or {}
        when = f"{state.get('started', '-')} .. {state.get('ended') or '-'}"
        click.echo(
            f"  {st.name:<14} {st.status:<8} last: {state.get('status', 'never ran'):<11} "
            f"{when}  fingerprint {state.get('fingerprint', '-')}"
        )
        if st.reasons:
            click.echo(f"      why: {'; '.join(st.reasons)}")
        if state.get("error"):
            click.echo(f"      error: {state['error']}")
        metrics = state.get("metrics") or {}
        try:
            readable = metric_lines(st.name, metrics, state.get("params") or {})
        except (TypeError, ValueError, KeyError, AttributeError):
            readable = None  # hand-edited metrics of the wrong type: shown raw below
        for line in readable or []:
            click.echo(f"      {line}")
        if metrics and readable is None:
            click.echo(
                f"      metrics: {json.dumps(metrics, ensure_ascii=False, sort_keys=True)[:400]}"
            )


@cli.command()
@recipe_arg
@set_opt
@unset_opt
@allow_opt
@click.option(
    "-n",
    "--examples",
    "n",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Training examples to show.",
)
@click.option(
    "--rows",
    "lint_rows",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Training rows the lint checks.",
)
@click.option(
    "--plain",
    is_flag=True,
    help="Mark masked tokens with [masked]...[/masked] instead of colours "
    "(the default when stdout is not a terminal).",
)
@reported
def inspect(
    recipe_file: Path,
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
    n: int,
    lint_rows: int,
    plain: bool,
) -> None:
    """Show rendered examples, which tokens are trained and which masked, and data warnings;
    runs nothing and writes nothing into the run directory."""
    from runner.data.inspection import inspect_recipe

    recipe = _load(recipe_file, overrides, allow, unsets)
    plain = plain or not sys.stdout.isatty()
    inspect_recipe(recipe, n=n, lint_rows=lint_rows, plain=plain, echo=click.echo)


@cli.command()
def schema() -> None:
    """Print the JSON Schema recipes are checked against."""
    from runner.recipe.schema import SCHEMA_PATH

    click.echo(SCHEMA_PATH.read_text(encoding="utf-8"), nl=False)


@cli.command()
@recipe_arg
@set_opt
@unset_opt
@allow_opt
@reported
def show(
    recipe_file: Path, overrides: tuple[str, ...], unsets: tuple[str, ...], allow: tuple[Path, ...]
) -> None:
    """Print the fully resolved recipe (extends, defaults, --unset and --set applied) as TOML."""
    click.echo(_load(recipe_file, overrides, allow, unsets).to_toml(), nl=False)


@cli.command()
@recipe_arg
@allow_opt
@reported
def lock(recipe_file: Path, allow: tuple[Path, ...]) -> None:
    """Write RECIPE.lock: model and data commits or hashes, template hashes, library versions.
    Resolving a hub revision to a commit needs the network."""
    from runner.lockfile import write_lock

    click.echo(f"wrote {write_lock(_load(recipe_file, (), allow), recipe_file)}")


@cli.command()
@click.argument("name")
@click.option(
    "--from",
    "starter",
    type=click.Choice(["adgen", "adgen-tiny", "chat", "alpaca"]),
    default="adgen",
    show_default=True,
    help="adgen: ChatGLM3-6B on a GPU; adgen-tiny: tiny model, CPU, Chinese ad copy; chat: "
    "multi-turn `messages` conversations, tiny model, CPU; alpaca: instruction / input / output "
    "rows, tiny model, CPU. The tiny ones copy a small demo data set into NAME/.",
)
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Folder to write into (default: the current one).",
)
@reported
def new(name: str, starter: str, folder: Path) -> None:
    """Write a commented starter recipe NAME.toml and the folder NAME/ it reads (templates, demo
    data, a schema copy): paths relative to NAME.toml, runs as written; never overwrites."""
    from runner.recipe.starters import new_recipe

    for path in new_recipe(name, starter, folder):
        click.echo(f"wrote {path}")


@cli.command(hidden=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the page to FILE instead of stdout.",
)
def reference(output: Path | None) -> None:
    """Print the recipe reference page (Markdown) generated from the schema."""
    from runner.recipe.reference import render_reference

    text = render_reference()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}")


def _note(message: str) -> None:
    click.echo(message, err=True)


base_opt = click.option(
    "--base", is_flag=True, help="Use the base model alone, without the trained adapter."
)
max_new_opt = click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    metavar="N",
    help="Override compare.max_new_tokens.",
)


@cli.command()
@recipe_arg
@click.option("--prompt", metavar="TEXT", help="The prompt exactly as the model sees it.")
@click.option(
    "--row",
    metavar="JSON",
    help="A data row rendered through the recipe's prompt template, "
    """e.g. '{"content": "类型#裙*颜色#红色"}'.""",
)
@base_opt
@max_new_opt
@set_opt
@unset_opt
@allow_opt
@reported
def generate(
    recipe_file: Path,
    prompt: str | None,
    row: str | None,
    base: bool,
    max_new_tokens: int | None,
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
) -> None:
    """Generate from one prompt with the fine-tuned model (decoding as in [compare])."""
    from runner.use import open_session, prompt_from_row

    if (prompt is None) == (row is None):
        raise RecipeError(
            "generate: pass exactly one of --prompt TEXT (the raw prompt) or "
            "--row JSON (rendered through the recipe's prompt template)"
        )
    recipe = _load_run(recipe_file, overrides, allow, unsets, _note)
    text = prompt if prompt is not None else prompt_from_row(recipe, str(row))
    session = open_session(recipe, base=base, log=_note, max_new_tokens=max_new_tokens)
    click.echo(session.reply(text))


@cli.command()
@recipe_arg
@click.option("--raw", is_flag=True, help="Each line is the whole prompt (no template).")
@base_opt
@max_new_opt
@set_opt
@unset_opt
@allow_opt
@reported
def chat(
    recipe_file: Path,
    raw: bool,
    base: bool,
    max_new_tokens: int | None,
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
) -> None:
    """Talk to the fine-tuned model: one user turn per line on stdin, replies on stdout; the
    conversation is kept (/reset starts over, /exit ends)."""
    from runner.use import chat_loop, open_session

    recipe = _load_run(recipe_file, overrides, allow, unsets, _note)
    session = open_session(recipe, base=base, log=_note, max_new_tokens=max_new_tokens)
    chat_loop(
        session,
        recipe,
        sys.stdin,
        say=click.echo,
        note=_note,
        marker=lambda: click.echo("> ", err=True, nl=False),
        raw=raw,
    )


@cli.command()
@recipe_arg
@click.option(
    "--merge",
    "merge_out",
    metavar="OUT",
    type=click.Path(path_type=Path),
    help="Write a merged model (adapter folded into the de-quantized base) to OUT.",
)
@click.option(
    "--adapter",
    "adapter_out",
    metavar="OUT",
    type=click.Path(path_type=Path),
    help="Write the adapter with a model card (README.md) to OUT.",
)
@click.option(
    "--chatglm-adapter",
    "chatglm_out",
    metavar="OUT",
    type=click.Path(path_type=Path),
    help="ChatGLM3 models: write the adapter in ChatGLM3's module names "
    "(query_key_value, ...) to OUT, for the original model's code.",
)
@set_opt
@unset_opt
@allow_opt
@reported
def export(
    recipe_file: Path,
    merge_out: Path | None,
    adapter_out: Path | None,
    chatglm_out: Path | None,
    overrides: tuple[str, ...],
    unsets: tuple[str, ...],
    allow: tuple[Path, ...],
) -> None:
    """Export the trained adapter (--adapter OUT) or a merged model (--merge OUT)."""
    from runner.export import export_adapter, export_merged

    if merge_out is None and adapter_out is None and chatglm_out is None:
        raise RecipeError(
            "export: pass --merge OUT (a merged model) and/or --adapter OUT "
            "(the adapter with a model card) and/or --chatglm-adapter OUT"
        )
    if merge_out and adapter_out and merge_out.resolve() == adapter_out.resolve():
        raise RecipeError(f"export: --merge and --adapter both name {merge_out}; use two folders")
    recipe = _load_run(recipe_file, overrides, allow, unsets, _note)
    if adapter_out is not None:
        export_adapter(recipe, adapter_out, _note)
    if merge_out is not None:
        export_merged(recipe, merge_out, _note)
    if chatglm_out is not None:
        from runner.export import export_chatglm_adapter

        export_chatglm_adapter(recipe, chatglm_out, _note)


def main() -> None:
    cli(prog_name="recipe")


if __name__ == "__main__":  # pragma: no cover
    main()

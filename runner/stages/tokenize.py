"""tokenize: the formatted rows through runner/data/tokenization.py (ids, masked labels,
truncation, the counts a user needs), written to data/tokenized through a temporary sibling, so
a crash never leaves a half-written dataset behind."""

from __future__ import annotations

from typing import Any

from runner.context import Context
from runner.data.chat import Encoder
from runner.data.conversations import MESSAGES
from runner.data.lint import tokenize_warnings
from runner.data.tokenization import tokenize_split, tokenizer_facts
from runner.errors import RecipeError
from runner.rundir import FORMATTED, TOKENIZED
from runner.state import fresh_tmp_dir, replace_dir


def run(ctx: Context) -> dict[str, Any]:
    from datasets import DatasetDict, load_from_disk

    from runner.data.chat import template_literals
    from runner.data.formatting import empty_shards
    from runner.models.load import load_tokenizer
    from runner.models.resolve import tokenizer_folder

    recipe = ctx.recipe
    cfg = recipe.section("tokenize")
    tok = load_tokenizer(tokenizer_folder(recipe, ctx.log))  # no weights needed
    encoder = Encoder(
        tok,
        recipe.get("template.format"),
        f"{recipe.path}: $.template.format",
        template_literals(recipe),
    )
    formatted = load_from_disk(str(ctx.path(FORMATTED)), keep_in_memory=True)
    out: dict[str, Any] = {}
    metrics: dict[str, Any] = {"tokenizer": tokenizer_facts(tok)}
    for split in ("train", "heldout"):
        out[split], metrics[split] = tokenize_split(formatted[split], encoder, cfg, cfg["num_proc"])
    if MESSAGES in formatted["train"].column_names:  # lint: can the template mark turns?
        metrics["turns"] = encoder.turn_problems()
    if metrics["train"]["rows"] == 0:
        raise RecipeError(
            f"{recipe.path}: $.tokenize.max_length: every training row was dropped "
            f"as longer than {cfg['max_length']} tokens; raise max_length or use "
            'truncation = "cut_prompt"'
        )
    final = ctx.path(TOKENIZED)
    tmp = fresh_tmp_dir(final)
    DatasetDict(out).save_to_disk(str(tmp), num_shards=empty_shards(out))
    replace_dir(tmp, final)
    t = metrics["train"]
    ctx.log(
        f"tokenize: {t['rows']} rows, {t['tokens']} tokens ({t['trained_tokens']} trained), "
        f"length p50 {t['length']['p50']:.0f} p99 {t['length']['p99']:.0f} "
        f"max {t['length']['max']:.0f}; truncated {t['truncated']}, dropped {t['dropped']}"
    )
    for warning in tokenize_warnings(metrics, cfg):
        ctx.log(f"tokenize: warning: {warning}")
    return metrics

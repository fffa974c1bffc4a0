"""format: the rows prepared by runner/data/formatting.py, written to data/formatted through a
temporary folder."""

from __future__ import annotations

from typing import Any

from runner.context import Context
from runner.data.conversations import MESSAGES
from runner.data.formatting import ROW, SOURCE, empty_shards, prepare
from runner.data.lint import GLUE_SAMPLE, format_warnings, glued_counts
from runner.report.data_metrics import source_lines
from runner.rundir import FORMATTED
from runner.state import fresh_tmp_dir, replace_dir


def run(ctx: Context) -> dict[str, Any]:
    from datasets import DatasetDict

    formatted = prepare(ctx.recipe)
    mixed = SOURCE in formatted.train.column_names  # a mix: its template sources' rows
    if mixed or ctx.recipe.get("dataset.format") == "template":  # conversations have headers
        sample = formatted.train.select(range(min(GLUE_SAMPLE, len(formatted.train)))).to_dict()
        pairs = [i for i, m in enumerate(sample.get(MESSAGES) or [""] * len(sample[ROW])) if not m]
        formatted.metrics.update(
            glued_counts(
                [sample["prompt"][i] for i in pairs],
                [sample["response"][i] for i in pairs],
                [sample[ROW][i] for i in pairs],
                ctx.recipe.get("template.format"),
            )
        )
    for warning in format_warnings(formatted.metrics):
        ctx.log(f"format: warning: {warning}")
    final = ctx.path(FORMATTED)
    tmp = fresh_tmp_dir(final)
    data = {"train": formatted.train, "heldout": formatted.heldout}
    DatasetDict(data).save_to_disk(  # ROW kept: tokenize names rows in warnings
        str(tmp), num_shards=empty_shards(data)
    )
    replace_dir(tmp, final)
    m = formatted.metrics
    ctx.log(f"format: {m['train_rows']} training rows, {m['heldout_rows']} held out")
    for line in source_lines(m):
        ctx.log(f"format: {line}")
    return m

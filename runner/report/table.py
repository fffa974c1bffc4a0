"""The before/after table: markdown for compare.md, rich for the terminal."""

from __future__ import annotations

from typing import Any


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = ["# Before / after fine-tuning", ""]
    lines += metric_lines(summary)
    mixed = any("source" in r for r in rows)  # [[dataset.sources]]: the row's data set
    source = (" | source" if mixed else "", "|---" if mixed else "")
    lines += [
        "",
        f"| #{source[0]} | prompt | reference | before | after |",
        f"|---{source[1]}|---|---|---|---|",
    ]
    for r in rows:
        where = f" | {_cell(r.get('source') or '')}" if mixed else ""
        lines.append(
            f"| {r['index']}{where} | {_cell(r['prompt'])} | {_cell(r.get('reference') or '')} | "
            f"{_cell(r['before'])} | {_cell(r['after'])} |"
        )
    return "\n".join(lines) + "\n"


def metric_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["| metric | before | after |", "|---|---|---|"]
    before, after = summary.get("before", {}), summary.get("after", {})
    for key in before:
        lines.append(f"| {key} | {before[key]} | {after.get(key)} |")
    loss = summary.get("heldout_loss")
    if loss:
        lines.append(f"| held-out loss | {loss['before']} | {loss['after']} |")
        lines.append(f"| held-out perplexity | {loss['before_ppl']} | {loss['after_ppl']} |")
    return lines


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], width: int = 60) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    metrics = Table(title="held-out metrics (higher is better, loss: lower)")
    for col in ("metric", "before", "after"):
        metrics.add_column(col)
    for line in metric_lines(summary)[2:]:
        metrics.add_row(*[c.strip() for c in line.strip("|").split("|")])
    console.print(metrics)
    table = Table(title="generations before / after fine-tuning", show_lines=True)
    for col in ("prompt", "reference", "before", "after"):
        table.add_column(col, max_width=width, overflow="fold")
    for r in rows:
        table.add_row(r["prompt"], r.get("reference") or "", r["before"], r["after"])
    console.print(table)

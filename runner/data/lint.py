"""Warnings about data that trains badly without failing: the format and tokenize stages log them,
`recipe inspect` prints them. Pure functions of the stages' counts (no torch, no datasets)."""

from __future__ import annotations

from typing import Any


def _of(n: int, total: int, what: str) -> str:
    return f"{n:,} of {total:,} {what}"


def _rows(numbers: list[int]) -> str:
    return ("row " if len(numbers) == 1 else "rows ") + ", ".join(str(n) for n in numbers)


def format_warnings(metrics: dict[str, Any]) -> list[str]:
    """From the format stage's counts: rows the templates rendered empty."""
    out = []
    for split in ("train", "heldout"):
        empty = metrics.get(f"{split}_empty") or {}
        prompts, responses = empty.get("prompt", 0), empty.get("response", 0)
        if prompts or responses:
            rows = ", ".join(str(r) for r in empty.get("rows", []))
            out.append(
                f"{split}: the template produced empty text in {prompts + responses:,} rows "
                f"({prompts:,} prompts, {responses:,} responses; e.g. rows {rows}): "
                'they were dropped (template.empty = "error" refuses them)'
            )
        bad = metrics.get(f"{split}_bad") or {}
        if bad.get("dropped"):
            why = bad.get("why", "print a null, boolean, list or dict value")
            out.append(
                f"{split}: {bad['dropped']:,} rows {why} "
                f"(e.g. {_rows(bad.get('rows', []))}): they were dropped "
                '(dataset.bad_rows = "drop")'
            )
    for source in metrics.get("sources") or []:  # a mix: each source's own rows, named
        out += [f"{source['source']}: {w}" for w in format_warnings(source)]
    return out


def tokenize_warnings(metrics: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """From the tokenize stage's counts (`metrics[split]`) and tokenizer facts."""
    out = [f"chat template: {problem}" for problem in metrics.get("turns") or []]
    facts = metrics.get("tokenizer") or {}
    max_length = cfg["max_length"]
    for split in ("train", "heldout"):
        m = metrics.get(split)
        if not m:
            continue
        total = m["rows"] + m["dropped"]
        if m.get("all_masked"):
            out.append(
                f"{split}: every label is masked in "
                f"{_of(m['all_masked'], m['rows'], 'rows')}: they teach nothing "
                "(an empty response, or one cut off by max_length)"
            )
        if m.get("eos_masked") and facts.get("pad_is_eos"):
            out.append(
                f"{split}: pad == eos ({facts.get('eos_token')!r}) and the eos is masked in "
                f"{_of(m['eos_masked'], m['rows'], 'rows')}: the model never learns to stop"
            )
        elif m.get("no_end_token"):
            cut = " (responses cut by max_length)" if m.get("truncated") else ""
            out.append(
                f"{split}: the end token {facts.get('eos_token')!r} is not trained in "
                f"{_of(m['no_end_token'], m['rows'], 'rows')}{cut}: the model does not "
                "learn to stop there"
            )
        if m.get("special_text"):
            out.append(
                f"{split}: {_of(m['special_text'], total, 'rows')} hold special-token strings "
                f"of the tokenizer in their data (e.g. {_rows(m.get('special_rows', []))}): "
                "they are encoded as plain "
                "text, not as control tokens; clean the data if that markup is not meant"
            )
        over = m.get("prompt_over_max", 0)
        if m.get("dropped"):
            why = f", {over:,} of them for their prompt alone" if over else ""
            out.append(
                f"{split}: {_of(m['dropped'], total, 'rows')} are longer than max_length = "
                f'{max_length} tokens{why}: dropped (truncation = "drop")'
            )
        elif over:
            out.append(
                f"{split}: {_of(over, total, 'prompts')} are longer than max_length = "
                f'{max_length} tokens: cut from the left (truncation = "cut_prompt"); '
                "raise tokenize.max_length to keep them whole"
            )
    return out

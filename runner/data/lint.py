"""Warnings about data that trains badly without failing: the format and tokenize stages log them,
`recipe inspect` prints them. Pure functions of the stages' counts (no torch, no datasets)."""

from __future__ import annotations

from typing import Any


def _of(n: int, total: int, what: str) -> str:
    return f"{n:,} of {total:,} {what}"


def _rows(numbers: list[int]) -> str:
    return ("row " if len(numbers) == 1 else "rows ") + ", ".join(str(n) for n in numbers)


GLUE_SAMPLE = 1000  # training rows the format stage checks for a prompt glued to its response


def _glued(prompt: str, response: str) -> bool:
    """Nothing separates the prompt from its response: no whitespace between them, and either a
    word runs into a word (`...Answer` + `Paris`) or a colon-like mark into a Latin word
    (`### Response:` + `The`). Chinese after `广告:` is how such copy is written: fine."""
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return False
    last, first = prompt[-1], response[0]
    if last.isalnum() and first.isalnum():
        return True
    return not last.isalnum() and first.isascii() and first.isalnum() and last in ":;,.!?>)]}"


def glued_counts(
    prompts: list[str], responses: list[str], rows: list[int], fmt: str
) -> dict[str, Any]:
    """The rows (of a sample) whose plain-format prompt runs straight into the response, for
    `format_warnings` (key `train_glued`); the chat formats put a role header between them."""
    if fmt != "plain":
        return {}
    found = [(n, p, r) for p, r, n in zip(prompts, responses, rows, strict=True) if _glued(p, r)]
    if not found:
        return {}
    n, p, r = found[0]
    return {
        "train_glued": {
            "count": len(found),
            "checked": len(prompts),
            "row": n,
            "junction": [p[-16:], r[:16]],
        }
    }


def _glue_warning(glued: dict[str, Any]) -> str:
    end, start = glued["junction"]
    return (
        f"train: the prompt runs straight into the response in {glued['count']:,} of "
        f"{glued['checked']:,} rows checked (row {glued['row']}: {end!r} + {start!r}): the model "
        "cannot tell where its answer starts; end the prompt template with a newline or a "
        "space (a template file keeps its final newline)"
    )


def format_warnings(metrics: dict[str, Any]) -> list[str]:
    """From the format stage's counts: rows the templates rendered empty, prompts glued to their
    responses."""
    out = []
    glued = metrics.get("train_glued")
    if isinstance(glued, dict) and glued.get("count"):
        out.append(_glue_warning(glued))
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

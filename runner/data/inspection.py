"""`recipe inspect`: what the model will be trained on, before anything runs.

Runs the format and tokenize logic in memory on the first rows of the training split (the rows
training sees first, after shuffling) and writes nothing into the run directory; it needs the
model's tokenizer alone, fetched or built as the tokenize stage does (no weights, no pre-training).
Shows rendered examples, a label view where trained and masked tokens look different (colours
on a terminal; `[masked]...[/masked]` in plain text), and the lint warnings of
`runner.data.lint` over a sample of rows, plus a check of the collator that training will use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.data.collate import IGNORE_INDEX
from runner.data.lint import format_warnings, tokenize_warnings
from runner.recipe import Recipe

TRAINED_STYLE = "bold green"
MASKED_STYLE = "grey50"
Segment = tuple[str, str | None]  # text, rich style (None: plain)


@dataclass
class Example:
    number: int  # 1-based row of its split in file order
    prompt: str
    response: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    dropped: bool


def label_segments(tok: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Runs of consecutive tokens with the same trained/masked state, decoded."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tok.decode(input_ids[start:i], skip_special_tokens=False)
            runs.append((text.replace("\n", "\\n"), labels[start] != IGNORE_INDEX))
            start = i
    return runs


def plain_label_view(runs: list[tuple[str, bool]]) -> str:
    return "".join(text if trained else f"[masked]{text}[/masked]" for text, trained in runs)


def collator_check(
    recipe: Recipe, tok: Any, rows: list[dict[str, list[int]]], eos: int
) -> list[str]:
    """Trained end tokens that the training collator would mask (pad == eos handled wrongly)."""
    from runner.data.collate import make_collator

    rows = [r for r in rows if r["input_ids"]][:8]
    if not rows:
        return []
    batch = make_collator(recipe, tok)([dict(r) for r in rows])
    before = sum(sum(1 for t in r["labels"] if t == eos) for r in rows)
    after = int((batch["labels"] == eos).sum())
    if after < before:
        return [
            f"collator: {before - after} of {before} trained end tokens are masked in a "
            "training batch (pad == eos?): the model never learns to stop"
        ]
    return []


def inspect_recipe(
    recipe: Recipe, n: int, lint_rows: int, plain: bool, echo: Callable[[str], None]
) -> list[str]:
    """Print the report; return the warnings."""
    import datasets

    from runner.data.chat import Encoder, template_literals
    from runner.data.conversations import MESSAGES, loads
    from runner.data.formatting import ROW, prepare
    from runner.data.tokenization import (
        encode_batch,
        encode_conversations,
        tokenize_split,
        tokenizer_facts,
    )
    from runner.models.load import load_tokenizer
    from runner.models.resolve import tokenizer_folder
    from runner.quiet import quiet_libraries

    quiet_libraries()
    datasets.disable_progress_bars()
    cfg = recipe.section("tokenize")
    fmt = recipe.get("template.format")
    formatted = prepare(recipe, limit=max(n, lint_rows))
    folder = tokenizer_folder(recipe, echo)
    tok = load_tokenizer(folder)
    encoder = Encoder(tok, fmt, f"{recipe.path}: $.template.format", template_literals(recipe))
    train, heldout = formatted.train, formatted.heldout
    shown = train.select(range(min(n, len(train)))).to_dict()
    conversations = shown.get(MESSAGES)
    if conversations is not None:
        encoded = encode_conversations(encoder, cfg, conversations, shown[ROW])
    else:
        encoded = encode_batch(encoder, cfg, shown["prompt"], shown["response"], shown[ROW])
    examples = [
        Example(number, p, r, ids, labels, trunc, not keep)
        for number, p, r, ids, labels, trunc, keep in zip(
            shown[ROW],
            shown["prompt"],
            shown["response"],
            encoded["input_ids"],
            encoded["labels"],
            encoded["truncated"],
            encoded["keep"],
            strict=True,
        )
    ]
    metrics: dict[str, Any] = {"tokenizer": tokenizer_facts(tok)}
    tokenized, metrics["train"] = tokenize_split(train, encoder, cfg)
    _, metrics["heldout"] = tokenize_split(heldout, encoder, cfg)
    if conversations is not None:
        metrics["turns"] = encoder.turn_problems()
    warnings = format_warnings(formatted.metrics) + tokenize_warnings(metrics, cfg)
    warnings += collator_check(
        recipe, tok, [tokenized[i] for i in range(min(8, len(tokenized)))], encoder.eos
    )

    out = Printer(plain, echo)
    facts = metrics["tokenizer"]
    out.line(
        f"recipe {recipe.name}: template.format = {fmt!r}, max_length {cfg['max_length']}, "
        f"truncation {cfg['truncation']!r}, train_on_prompt {cfg['train_on_prompt']}, "
        f"packing {recipe.get('train.packing')}"
    )
    out.line(
        f"tokenizer {folder}: eos {facts['eos_token']!r}, pad {facts['pad_token']!r}, "
        f"padding side {facts['padding_side']}"
    )
    if plain:
        out.line("labels: text in [masked]...[/masked] is masked (no loss); the rest is trained")
    else:
        out.segments(
            [
                ("labels: ", None),
                ("trained", TRAINED_STYLE),
                (" / ", None),
                ("masked", MASKED_STYLE),
                (" (no loss)", None),
            ]
        )
    label_width = 8 if conversations is None else 20
    for i, ex in enumerate(examples, start=1):
        trained = sum(1 for t in ex.labels if t != IGNORE_INDEX)
        state = (
            " · dropped (longer than max_length)"
            if ex.dropped
            else (" · truncated to max_length" if ex.truncated else "")
        )
        out.line("")
        out.line(
            f"── example {i} of {len(examples)} · {formatted.train_split} row {ex.number} · "
            f"{len(ex.input_ids)} tokens: {trained} trained, "
            f"{len(ex.input_ids) - trained} masked{state}"
        )
        if conversations is not None:  # every turn, and whether it is trained
            for m in loads(conversations[i - 1]):
                mask = "trained" if m["train"] or cfg["train_on_prompt"] else "masked"
                out.block(f"{m['role']} ({mask})", m["content"], width=20)
        else:
            out.block("prompt", ex.prompt)
            out.block("response", ex.response)
        runs = label_segments(tok, ex.input_ids, ex.labels)
        if plain:
            out.line(f"{'labels':<{label_width}} | {plain_label_view(runs)}")
        else:
            out.segments(
                [(f"{'labels':<{label_width}} | ", None)]
                + [(text, TRAINED_STYLE if t else MASKED_STYLE) for text, t in runs]
            )
    out.line("")
    sample = metrics["train"]["rows"] + metrics["train"]["dropped"]
    out.line(
        f"lint: {sample:,} of {formatted.metrics['rows_available']:,} training rows, "
        f"{len(heldout):,} held-out rows"
    )
    for w in warnings:
        out.segments([("  warning: ", None if plain else "bold yellow"), (w, None)])
    if not warnings:
        out.line("  no problems found")
    return warnings


class Printer:
    """Plain lines through `echo`, or styled ones through rich."""

    def __init__(self, plain: bool, echo: Callable[[str], None]) -> None:
        self.plain = plain
        self.echo = echo
        self.console: Any = None
        if not plain:
            from rich.console import Console

            self.console = Console(highlight=False, soft_wrap=True)

    def line(self, text: str) -> None:
        self.segments([(text, None)])

    def block(self, label: str, text: str, width: int = 8) -> None:
        lines = text.split("\n") or [""]
        for j, part in enumerate(lines):
            self.line(f"{label if j == 0 else '':<{width}} | {part}")

    def segments(self, parts: list[Segment]) -> None:
        if self.plain:
            self.echo("".join(text for text, _ in parts))
            return
        from rich.text import Text

        line = Text()
        for text, style in parts:
            line.append(text, style=style or "")
        self.console.print(line)

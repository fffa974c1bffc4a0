"""compare: the same prompts through the base (adapter disabled) and the fine-tuned model."""

from __future__ import annotations

import json
import math
from typing import Any

from runner.context import Context
from runner.data.collate import IGNORE_INDEX
from runner.report.metrics import scores, summary
from runner.report.table import markdown
from runner.rundir import (
    ADAPTER,
    COMPARE_ROWS,
    COMPARE_TABLE,
    FORMATTED,
    LOG_HISTORY,
    REPORT,
    RESOLVED_RECIPE,
    TOKENIZED,
    read_record,
    state_metrics,
    state_path,
)
from runner.state import write_text_atomic

HELDOUT_LOSS_ROWS = 64


def prompts(ctx: Context) -> list[dict[str, Any]]:
    """Held-out rows (prompt + reference) and the recipe's extra prompts (no reference)."""
    from datasets import load_from_disk

    from runner.data.conversations import MESSAGES, loads
    from runner.data.formatting import SOURCE
    from runner.data.templates import Renderer, template_sources
    from runner.recipe.mix import source_recipes

    cfg = ctx.recipe.section("compare")
    heldout = load_from_disk(str(ctx.path(FORMATTED)), keep_in_memory=True)["heldout"]
    rows = [
        {"prompt": p, "reference": r}
        for p, r in zip(
            heldout["prompt"][: cfg["num_examples"]],
            heldout["response"][: cfg["num_examples"]],
            strict=True,
        )
    ]
    if not rows:
        ctx.log(
            "compare: no held-out rows (dataset.heldout_rows = 0): no references to score; "
            + (
                f"generating for the {len(cfg['prompts'])} compare.prompts only"
                if cfg["prompts"]
                else "add compare.prompts or held-out rows to see generations"
            )
        )
    if SOURCE in heldout.column_names:  # a mix: which [[dataset.sources]] table it came from
        labels = [s.label for s in source_recipes(ctx.recipe)]
        for r, index in zip(rows, heldout[SOURCE][: len(rows)], strict=True):
            r["source"] = labels[index]
    templates = template_sources(ctx.recipe)
    if MESSAGES in heldout.column_names:  # a conversation: its turns before the last reply
        for r, text in zip(rows, heldout[MESSAGES][: len(rows)], strict=True):
            if text:  # empty: a template source's row in a mix (its prompt is text)
                r["messages"] = loads(text)[:-1]
    if "prompt" not in templates:  # conversations, or a mix whose sources have their own
        talks = MESSAGES in heldout.column_names and any(heldout[MESSAGES])
        for extra in cfg["prompts"]:  # the user's turn, as written (the encoder adds the rest)
            text = "\n".join(map(str, extra.values()))
            mixed = SOURCE in heldout.column_names and talks
            turn = [{"role": "user", "content": text}] if mixed else None
            rows.append({"prompt": text, "reference": None, **({"messages": turn} if turn else {})})
    else:
        renderer = Renderer(templates)
        for i, extra in enumerate(cfg["prompts"]):
            text = renderer.render_part("prompt", extra, i, "compare.prompts", drop_hint=False)
            rows.append({"prompt": text, "reference": None})
    return [{"index": i, **r} for i, r in enumerate(rows)]


def heldout_loss(model: Any, tok: Any, ctx: Context) -> float | None:
    """Mean loss per trained token on the tokenized held-out rows."""
    from datasets import load_from_disk

    data = load_from_disk(str(ctx.path(TOKENIZED)), keep_in_memory=True)["heldout"]
    n = min(len(data), HELDOUT_LOSS_ROWS)
    if n == 0:
        return None
    return mean_token_loss(model, tok, [data[i] for i in range(n)])


def mean_token_loss(model: Any, tok: Any, rows: list[dict[str, Any]]) -> float:
    """Mean loss per trained token on tokenized `rows`, right-padded batches of 8 (the same
    measure whatever a run's own batching; bench/quality.py uses it too)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    tok.padding_side = "right"
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = {k: v.to(model.device) for k, v in collate(rows[start : start + 8]).items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(losses)
            count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def run(ctx: Context) -> dict[str, Any]:
    from peft import PeftModel

    from runner.models.generate import generate, prompt_encoder
    from runner.models.load import load_base, load_tokenizer
    from runner.models.resolve import materialize

    recipe = ctx.recipe
    cfg = recipe.section("compare")
    folder = materialize(recipe, ctx.log)
    tok = load_tokenizer(folder)
    model = PeftModel.from_pretrained(load_base(recipe, folder), str(ctx.path(ADAPTER)))
    model.eval()
    encoder = prompt_encoder(recipe, tok)  # prompts encoded exactly as the tokenize stage does
    rows = prompts(ctx)
    texts = [r.pop("messages", None) or r["prompt"] for r in rows]
    with model.disable_adapter():
        before = generate(model, tok, encoder, texts, cfg, recipe.seed)
        loss_before = heldout_loss(model, tok, ctx)
    after = generate(model, tok, encoder, texts, cfg, recipe.seed)
    loss_after = heldout_loss(model, tok, ctx)
    for r, b, a in zip(rows, before, after, strict=True):
        r["before"], r["after"] = b, a
        if r["reference"]:
            r["before_scores"] = scores(b, r["reference"], cfg["metrics"])
            r["after_scores"] = scores(a, r["reference"], cfg["metrics"])
    result = summary(rows)
    if loss_before is not None and loss_after is not None:
        result["heldout_loss"] = {
            "before": round(loss_before, 4),
            "after": round(loss_after, 4),
            "before_ppl": round(math.exp(min(loss_before, 50)), 2),
            "after_ppl": round(math.exp(min(loss_after, 50)), 2),
        }
    write_text_atomic(
        ctx.path(COMPARE_ROWS),
        "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
    )
    write_text_atomic(ctx.path(COMPARE_TABLE), markdown(rows, result))
    write_text_atomic(ctx.path(REPORT), report(ctx, rows, result))
    ctx.log(
        f"compare: {len(rows)} prompts; before {result.get('before')} "
        f"after {result.get('after')}; report {ctx.path(REPORT)}"
    )
    return result


def logged_losses(history: list[Any]) -> list[dict[str, Any]]:
    """The log history's entries the loss curve can draw: a hand-edited or damaged file draws
    what is left of it instead of failing the stage at its last step."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    return [
        {k: e[k] for k in ("step", "loss", "eval_loss") if k in e and number(e[k])}
        for e in history
        if isinstance(e, dict) and number(e.get("step"))
    ]


def report(ctx: Context, rows: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """report.html: the recipe, the loss curve from train/log_history.json, metrics, examples."""
    from runner.report.html import recipe_summary, render

    history = logged_losses(read_record(ctx.path(LOG_HISTORY), list) or [])
    train = state_path(ctx.run_dir, "train")
    resolved = ctx.path(RESOLVED_RECIPE)
    return render(
        title=f"{ctx.recipe.name}: fine-tuning report",
        summary_pairs=recipe_summary(ctx.recipe.data),
        rows=rows,
        summary=result,
        history=history,
        resolved_toml=resolved.read_text(encoding="utf-8") if resolved.is_file() else None,
        train_metrics=state_metrics(train) if train.is_file() else None,
    )

"""compare: the same prompts through the base (adapter disabled) and the fine-tuned model."""

from __future__ import annotations

import json
import math
from typing import Any

from runner.context import Context
from runner.report.metrics import scores, summary
from runner.report.table import markdown

HELDOUT_LOSS_ROWS = 64


def prompts(ctx: Context) -> list[dict[str, Any]]:
    """Held-out rows (prompt + reference) and the recipe's extra prompts (no reference)."""
    from datasets import load_from_disk

    from runner.data.templates import Renderer, template_sources

    cfg = ctx.recipe.section("compare")
    heldout = load_from_disk(str(ctx.path("data/formatted")), keep_in_memory=True)["heldout"]
    rows = [{"prompt": p, "reference": r}
            for p, r in zip(heldout["prompt"][: cfg["num_examples"]],
                            heldout["response"][: cfg["num_examples"]])]
    renderer = Renderer(template_sources(ctx.recipe))
    for i, extra in enumerate(cfg["prompts"]):
        rows.append({"prompt": renderer.render_part("prompt", extra, i), "reference": None})
    return [{"index": i, **r} for i, r in enumerate(rows)]


def generate(model: Any, tok: Any, texts: list[str], cfg: dict[str, Any], seed: int) -> list[str]:
    import torch

    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True).to(model.device)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"max_new_tokens": cfg["max_new_tokens"], "do_sample": cfg["do_sample"],
                              "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if cfg["do_sample"]:
        kwargs.update(temperature=cfg["temperature"], top_p=cfg["top_p"])
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def heldout_loss(model: Any, tok: Any, ctx: Context) -> float | None:
    """Mean loss per trained token on the tokenized held-out rows."""
    import torch
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq

    data = load_from_disk(str(ctx.path("data/tokenized")), keep_in_memory=True)["heldout"]
    n = min(len(data), HELDOUT_LOSS_ROWS)
    if n == 0:
        return None
    tok.padding_side = "right"
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, 8):
            rows = [data[i] for i in range(start, min(n, start + 8))]
            batch = {k: v.to(model.device) for k, v in collate(rows).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((labels != -100).sum())
    return total / max(count, 1)


def run(ctx: Context) -> dict[str, Any]:
    from peft import PeftModel

    from runner.models.load import load_base, load_tokenizer
    from runner.models.resolve import materialize

    recipe = ctx.recipe
    cfg = recipe.section("compare")
    folder = materialize(recipe, ctx.log)
    tok = load_tokenizer(folder)
    model = PeftModel.from_pretrained(load_base(recipe, folder), str(ctx.path("adapter")))
    model.eval()
    rows = prompts(ctx)
    texts = [r["prompt"] for r in rows]
    with model.disable_adapter():
        before = generate(model, tok, texts, cfg, recipe.seed) if texts else []
        loss_before = heldout_loss(model, tok, ctx)
    after = generate(model, tok, texts, cfg, recipe.seed) if texts else []
    loss_after = heldout_loss(model, tok, ctx)
    for r, b, a in zip(rows, before, after):
        r["before"], r["after"] = b, a
        if r["reference"]:
            r["before_scores"], r["after_scores"] = scores(b, r["reference"]), scores(a, r["reference"])
    result = summary(rows)
    if loss_before is not None and loss_after is not None:
        result["heldout_loss"] = {"before": round(loss_before, 4), "after": round(loss_after, 4),
                                  "before_ppl": round(math.exp(min(loss_before, 50)), 2),
                                  "after_ppl": round(math.exp(min(loss_after, 50)), 2)}
    with open(ctx.path("compare.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    ctx.path("compare.md").write_text(markdown(rows, result), encoding="utf-8")
    ctx.log(f"compare: {len(rows)} prompts; before {result.get('before')} after {result.get('after')}")
    return result

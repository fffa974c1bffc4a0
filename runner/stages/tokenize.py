"""tokenize: input_ids and labels; the loss is on the response and its end token only."""

from __future__ import annotations

from typing import Any

from runner.context import Context
from runner.errors import RecipeError
from runner.state import fresh_tmp_dir, replace_dir

IGNORE = -100


def encode(prompt_ids: list[int], response_ids: list[int], eos_id: int, max_length: int,
           truncation: str, train_on_prompt: bool) -> tuple[list[int], list[int], bool] | None:
    """One example; None when it must be dropped. Returns (input_ids, labels, truncated)."""
    response = [*response_ids, eos_id]
    truncated = len(prompt_ids) + len(response) > max_length
    if truncated:
        if truncation == "drop":
            return None
        keep_prompt = max(max_length - len(response), min(len(prompt_ids), max_length // 4))
        response = response[: max_length - keep_prompt]
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:] if keep_prompt else []
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE] * len(prompt_ids)
    return [*prompt_ids, *response], [*prompt_labels, *response], truncated


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))])

    return {"min": float(ordered[0]), "mean": round(sum(ordered) / len(ordered), 1), "p50": at(0.5),
            "p90": at(0.9), "p99": at(0.99), "max": float(ordered[-1])}


def tokenize_split(ds: Any, tok: Any, cfg: dict[str, Any], num_proc: int) -> tuple[Any, int, int]:
    eos = tok.eos_token_id

    def enc(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        prompts = tok(batch["prompt"], add_special_tokens=True)["input_ids"]
        responses = tok(batch["response"], add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "truncated": [], "keep": []}
        for p, r in zip(prompts, responses):
            example = encode(p, r, eos, cfg["max_length"], cfg["truncation"], cfg["train_on_prompt"])
            ids, labels, truncated = example if example else ([], [], True)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
            out["keep"].append(example is not None)
        return out

    mapped = ds.map(enc, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                    load_from_cache_file=False, desc="tokenize")
    truncated = sum(mapped["truncated"])
    kept = mapped.filter(lambda b: b["keep"], batched=True, load_from_cache_file=False)
    dropped = len(mapped) - len(kept)
    kept = kept.remove_columns(["truncated", "keep"])
    return kept, truncated - dropped, dropped


def run(ctx: Context) -> dict[str, Any]:
    from datasets import DatasetDict, load_from_disk

    from runner.models.load import load_tokenizer
    from runner.models.resolve import materialize

    recipe = ctx.recipe
    cfg = recipe.section("tokenize")
    tok = load_tokenizer(materialize(recipe, ctx.log))
    if tok.eos_token_id is None:
        raise RecipeError(f"{recipe.path}: $.model.name_or_path: the tokenizer has no eos token; "
                          "the model could never learn to stop")
    formatted = load_from_disk(str(ctx.path("data/formatted")), keep_in_memory=True)
    out: dict[str, Any] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for split in ("train", "heldout"):
        ds, truncated, dropped = tokenize_split(formatted[split], tok, cfg, cfg["num_proc"])
        lengths = [len(x) for x in ds["input_ids"]]
        trained = sum(sum(1 for t in labels if t != IGNORE) for labels in ds["labels"])
        metrics[split] = {"rows": len(ds), "truncated": truncated, "dropped": dropped,
                          "tokens": sum(lengths), "trained_tokens": trained,
                          "length": percentiles(lengths)}
        out[split] = ds
    if metrics["train"]["rows"] == 0:
        raise RecipeError(f"{recipe.path}: $.tokenize.max_length: every training row was dropped as "
                          f"longer than {cfg['max_length']} tokens; raise max_length or use "
                          "truncation = \"cut_prompt\"")
    final = ctx.path("data/tokenized")
    tmp = fresh_tmp_dir(final)
    DatasetDict(out).save_to_disk(str(tmp))
    replace_dir(tmp, final)
    t = metrics["train"]
    ctx.log(f"tokenize: {t['rows']} rows, {t['tokens']} tokens, length p50 {t['length']['p50']:.0f} "
            f"p99 {t['length']['p99']:.0f} max {t['length']['max']:.0f}; truncated {t['truncated']}, "
            f"dropped {t['dropped']}")
    return metrics

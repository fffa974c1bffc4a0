"""format: load the rows, shuffle, split off held-out rows, render prompt and response."""

from __future__ import annotations

from typing import Any

from runner.context import Context
from runner.data.sources import load_split
from runner.data.templates import Renderer, template_sources
from runner.errors import RecipeError
from runner.state import fresh_tmp_dir, replace_dir


def _rename(ds: Any, columns: dict[str, str], where: str) -> Any:
    missing = [old for old in columns.values() if old not in ds.column_names]
    if missing:
        raise RecipeError(f"{where}: $.dataset.columns: no column {', '.join(map(repr, missing))}; "
                          f"the data has: {', '.join(ds.column_names)}")
    return ds.rename_columns({old: new for new, old in columns.items() if old != new})


def render_rows(ds: Any, renderer: Renderer) -> tuple[Any, int]:
    """A dataset of (prompt, response), without rows whose prompt or response is empty."""

    def fmt(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[str]]:
        prompts, responses = [], []
        for i, index in enumerate(indices):
            row = {k: v[i] for k, v in batch.items()}
            p, r = renderer.render(row, index)
            prompts.append(p)
            responses.append(r)
        return {"prompt": prompts, "response": responses}

    out = ds.map(fmt, batched=True, with_indices=True, remove_columns=ds.column_names,
                 load_from_cache_file=False, desc="format")
    kept = out.filter(lambda b: [bool(p.strip()) and bool(r.strip())
                                 for p, r in zip(b["prompt"], b["response"])],
                      batched=True, load_from_cache_file=False)
    return kept, len(out) - len(kept)


def run(ctx: Context) -> dict[str, Any]:
    from datasets import DatasetDict

    recipe = ctx.recipe
    cfg = recipe.section("dataset")
    where = str(recipe.path)
    train = _rename(load_split(recipe, cfg["split"]), cfg["columns"], where)
    if cfg["shuffle"]:
        train = train.shuffle(seed=recipe.seed)
    if cfg["heldout_split"]:
        heldout = _rename(load_split(recipe, cfg["heldout_split"]), cfg["columns"], where)
    else:
        n = cfg["heldout_rows"]
        if n >= len(train):
            raise RecipeError(f"{where}: $.dataset.heldout_rows: {n} rows held out but the split has "
                              f"only {len(train)}; lower heldout_rows")
        heldout = train.select(range(len(train) - n, len(train)))
        train = train.select(range(len(train) - n))
    if cfg["max_rows"]:
        train = train.select(range(min(cfg["max_rows"], len(train))))
    renderer = Renderer(template_sources(recipe))
    train, dropped = render_rows(train, renderer)
    heldout, dropped_heldout = render_rows(heldout, renderer)
    if dropped:
        ctx.log(f"format: dropped {dropped} rows with an empty prompt or response")
    if len(train) == 0:
        raise RecipeError(f"{where}: no training rows left after formatting; check dataset.split "
                          "and the templates")
    final = ctx.path("data/formatted")
    tmp = fresh_tmp_dir(final)
    DatasetDict({"train": train, "heldout": heldout}).save_to_disk(str(tmp))
    replace_dir(tmp, final)
    ctx.log(f"format: {len(train)} training rows, {len(heldout)} held out")
    return {"train_rows": len(train), "heldout_rows": len(heldout),
            "dropped_empty": dropped + dropped_heldout}

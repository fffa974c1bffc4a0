"""The format stage's data logic: load the rows, flatten and rename columns, shuffle, split off
held-out rows, render prompt and response with the sandboxed templates.

`prepare` does the work in memory: the format stage (runner/stages/format.py) writes its result
to the run directory, `recipe inspect` (runner/data/inspection.py) uses it on a few rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.data.conversations import MESSAGES, ConversationError, Conversations, dumps, readable
from runner.data.sources import data_name, load_split, parse_split, slice_rows
from runner.data.templates import DataValueError, Renderer, template_sources
from runner.errors import RecipeError
from runner.recipe import Recipe
from runner.recipe.mix import has_sources, rekeyed, source_recipes

ROW = "__source_row__"  # 1-based row of the split in file order, for messages; never templated
EMPTY_PROMPT, EMPTY_RESPONSE = "__empty_prompt__", "__empty_response__"
BAD = "__bad_value__"  # the row printed a null, bool, list or dict (dataset.bad_rows = "drop")
SOURCE = "__source__"  # the index of the [[dataset.sources]] table a mixed row came from
SHOWN_ROWS = 5  # rows named in an empty-text warning or error


def flatten_columns(ds: Any, where: Any) -> Any:
    """Nested (struct) columns become top-level ones named parent_child."""
    flat = ds.flatten()
    renames = {c: c.replace(".", "_") for c in flat.column_names if "." in c}
    clashes = sorted(new for new in renames.values() if new in flat.column_names)
    if clashes:
        raise RecipeError(
            f"{where}: $.dataset.flatten: flattened column {clashes[0]!r} clashes "
            "with an existing column; rename one of them in the data"
        )
    return flat.rename_columns(renames) if renames else flat


def shape_columns(ds: Any, recipe: Recipe) -> Any:
    """dataset.flatten, then dataset.columns ({new = "old"})."""
    cfg = recipe.section("dataset")
    if cfg.get("flatten"):
        ds = flatten_columns(ds, recipe.origin("dataset.flatten"))
    columns = cfg["columns"]
    missing = [old for old in columns.values() if old not in ds.column_names]
    if missing:
        have = ", ".join(c for c in ds.column_names if c != ROW)
        raise RecipeError(
            f"{recipe.origin('dataset.columns')}: $.dataset.columns: no column "
            f"{', '.join(map(repr, missing))}; the data has: {have}"
        )
    renames = {old: new for new, old in columns.items() if old != new}
    return ds.rename_columns(renames) if renames else ds


def split_name(recipe: Recipe, key: str) -> str:
    """The split a `dataset.split`-like key names (`train[:1%]` -> train)."""
    try:
        return parse_split(recipe.get(key))[0]
    except ValueError as e:
        raise RecipeError(f"{recipe.origin(key)}: $.{key}: {e}") from None


def load_rows(recipe: Recipe, key: str) -> Any:
    """The split `key` names (sliced as it says), its columns shaped, with the 1-based source row
    number in ROW (rows of `train[100:200]` are numbered 101..200, as in the file)."""
    ds = load_split(recipe, split_name(recipe, key))
    reserved = [c for c in ds.column_names if c.startswith("__") and c.endswith("__")]
    renamed = [c for pair in recipe.section("dataset")["columns"].items() for c in pair]
    if reserved or ROW in renamed:
        name = reserved[0] if reserved else ROW
        where = data_name(recipe) if reserved else recipe.origin("dataset.columns")
        raise RecipeError(
            f"{where}: column {name!r}: names like __this__ are reserved for the runner; "
            "rename the column in the data"
        )
    ds = slice_rows(ds.add_column(ROW, list(range(1, len(ds) + 1))), recipe.get(key))
    return shape_columns(ds, recipe)


def render_rows(
    ds: Any,
    renderer: Renderer,
    split: str,
    on_empty: str = "drop",
    source: str | None = None,
    bad_rows: str = "error",
) -> tuple[Any, dict[str, Any]]:
    """(prompt, response, ROW) rows, without those whose prompt or response is empty (or that
    print a non-text value, with bad_rows = "drop"); and the counts of empty prompts and
    responses, and of bad rows, with the first few row numbers."""
    import numpy as np

    def fmt(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts, responses, empty_p, empty_r, bad = [], [], [], [], []
        names = [k for k in batch if k != ROW]
        for i, number in enumerate(batch[ROW]):
            row = {k: batch[k][i] for k in names}
            try:
                p, r = renderer.render(row, number, f"{split} row", source)
            except DataValueError:
                if bad_rows != "drop":
                    raise
                p, r = "", ""
                bad.append(True)
            else:
                bad.append(False)
            prompts.append(p)
            responses.append(r)
            empty_p.append(not bad[-1] and not p.strip())
            empty_r.append(not bad[-1] and not r.strip())
        return {
            "prompt": prompts,
            "response": responses,
            ROW: batch[ROW],
            EMPTY_PROMPT: empty_p,
            EMPTY_RESPONSE: empty_r,
            BAD: bad,
        }

    if len(ds) == 0:  # map would return no columns at all
        from datasets import Dataset, Features, Value

        none: dict[str, Any] = {
            "prompt": 0,
            "response": 0,
            "rows": [],
            "dropped": 0,
            "bad": 0,
            "bad_rows": [],
        }
        features = Features(
            {"prompt": Value("string"), "response": Value("string"), ROW: Value("int64")}
        )
        return Dataset.from_dict({"prompt": [], "response": [], ROW: []}, features), none
    out = ds.map(
        fmt,
        batched=True,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
        desc=f"format {split}",
    )
    empty_p = out.data.column(EMPTY_PROMPT).to_numpy(zero_copy_only=False).astype(bool)
    empty_r = out.data.column(EMPTY_RESPONSE).to_numpy(zero_copy_only=False).astype(bool)
    bad = out.data.column(BAD).to_numpy(zero_copy_only=False).astype(bool)
    out = out.remove_columns([EMPTY_PROMPT, EMPTY_RESPONSE, BAD])
    empty = empty_p | empty_r
    numbers = out.data.column(ROW).to_numpy(zero_copy_only=False)
    empty_rows = [int(n) for n in numbers[empty]]
    counts = {
        "prompt": int(empty_p.sum()),
        "response": int(empty_r.sum()),
        "rows": empty_rows[:SHOWN_ROWS],
        "dropped": len(empty_rows),
        "bad": int(bad.sum()),
        "bad_rows": [int(n) for n in numbers[bad][:SHOWN_ROWS]],
    }
    if empty_rows and on_empty == "error":
        shown = ", ".join(str(n) for n in empty_rows[:SHOWN_ROWS])
        raise RecipeError(
            f"template: the template produced an empty prompt or response in "
            f"{len(empty_rows):,} {split} rows (rows {shown}); fix the data or the "
            'template, or set template.empty = "drop" to drop them'
        )
    if empty_rows or bad.any():
        out = out.select(np.flatnonzero(~(empty | bad)))
    return out, counts


def render_conversations(
    ds: Any,
    conv: Conversations,
    split: str,
    on_empty: str = "drop",
    source: str | None = None,
    bad_rows: str = "error",
) -> tuple[Any, dict[str, Any]]:
    """Conversation rows as (prompt, response, MESSAGES, ROW): `render_rows` for
    dataset.format = messages / sharegpt / alpaca. The prompt is the turns before the last
    assistant turn as `role: text` lines, the response that turn (compare's reference)."""
    from datasets import Dataset, Features, Value

    required, optional = conv.columns()
    used = [c for c in (*required, *optional) if c in ds.column_names]
    out: dict[str, list[Any]] = {"prompt": [], "response": [], MESSAGES: [], ROW: []}
    empty_p, empty_r, empty_rows, bad_numbers = 0, 0, [], []
    for row in ds.select_columns([*used, ROW]):
        number = row[ROW]
        try:
            messages = conv.messages(row)
        except ConversationError as e:
            if bad_rows != "drop":
                raise ConversationError(e.describe(source or "data", split, number)) from None
            bad_numbers.append(number)
            continue
        response = messages[-1]["content"]
        asked = any(m["content"].strip() for m in messages[:-1])
        if not asked or not response.strip():
            empty_p += not asked
            empty_r += not response.strip()
            empty_rows.append(number)
            continue
        out["prompt"].append(readable(messages[:-1]))
        out["response"].append(response)
        out[MESSAGES].append(dumps(messages))
        out[ROW].append(number)
    counts = {
        "prompt": empty_p,
        "response": empty_r,
        "rows": empty_rows[:SHOWN_ROWS],
        "dropped": len(empty_rows),
        "bad": len(bad_numbers),
        "bad_rows": bad_numbers[:SHOWN_ROWS],
    }
    if empty_rows and on_empty == "error":
        shown = ", ".join(str(n) for n in empty_rows[:SHOWN_ROWS])
        raise RecipeError(
            f"{source}: {len(empty_rows):,} {split} rows have an empty last assistant turn or "
            f"nothing before it (rows {shown}); fix the data, or set template.empty = "
            '"drop" to drop them'
        )
    features = Features({k: Value("int64" if k == ROW else "string") for k in out})
    return Dataset.from_dict(out, features), counts


def check_disjoint(recipe: Recipe, train: Any, heldout: Any) -> None:
    """Held-out rows must not be training rows (compare would score what was trained on):
    the same split sliced twice must not share source rows."""
    import numpy as np

    trained = np.asarray(train.data.column(ROW).to_numpy(zero_copy_only=False))
    held = np.asarray(heldout.data.column(ROW).to_numpy(zero_copy_only=False))
    shared = np.intersect1d(trained, held)
    if shared.size:
        raise RecipeError(
            f"{recipe.origin('dataset.heldout_split')}: $.dataset.heldout_split: "
            f"{recipe.get('dataset.heldout_split')!r} shares {shared.size:,} rows with the "
            f"training split {recipe.get('dataset.split')!r} (e.g. row {int(shared[0])}); "
            'use disjoint slices (split = "train[:90%]", heldout_split = "train[90%:]") '
            "or heldout_rows"
        )


@dataclass
class Formatted:
    train: Any
    heldout: Any
    metrics: dict[str, Any]
    train_split: str = "train"  # the split's name, for messages


def prepare(recipe: Recipe, limit: int | None = None) -> Formatted:
    """The formatted train and held-out rows, in memory. `limit`: render only the first rows of
    each split (after shuffling and the held-out split), for a preview."""
    if has_sources(recipe):
        return prepare_mix(recipe, limit)
    cfg = recipe.section("dataset")
    where = str(recipe.path)
    conv = Conversations.from_recipe(recipe)
    # template errors before any data is read
    renderer = Renderer(template_sources(recipe)) if conv is None else None
    train = load_rows(recipe, "dataset.split")
    if conv is not None:
        shown = [c for c in train.column_names if c != ROW]
        conv.check_columns(train.column_names, str(recipe.origin("dataset.format")), shown)
    if cfg["shuffle"]:
        train = train.shuffle(seed=recipe.seed)
    train_name = split_name(recipe, "dataset.split")
    heldout_name = train_name
    if cfg["heldout_split"]:
        heldout = load_rows(recipe, "dataset.heldout_split")
        if conv is not None:
            shown = [c for c in heldout.column_names if c != ROW]
            conv.check_columns(heldout.column_names, str(recipe.origin("dataset.format")), shown)
        heldout_name = split_name(recipe, "dataset.heldout_split")
    else:
        n = cfg["heldout_rows"]
        if n and n >= len(train):
            raise RecipeError(
                f"{recipe.origin('dataset.heldout_rows')}: $.dataset.heldout_rows: "
                f"{n} rows held out but the split {cfg['split']!r} has only "
                f"{len(train)}; lower heldout_rows"
            )
        # select(range(k, k)) at the end fails on an empty range: no rows is an empty list
        heldout = train.select(list(range(len(train) - n, len(train))))
        train = train.select(range(len(train) - n))
    if cfg["max_rows"]:
        train = train.select(range(min(cfg["max_rows"], len(train))))
    if cfg["heldout_split"] and heldout_name == train_name:
        check_disjoint(recipe, train, heldout)
    available = len(train)
    if limit is not None:
        train = train.select(range(min(limit, len(train))))
        heldout = heldout.select(range(min(limit, len(heldout))))
    on_empty = recipe.get("template.empty")
    bad_rows = recipe.get("dataset.bad_rows")
    source = data_name(recipe)
    if conv is not None:
        train, train_empty = render_conversations(
            train, conv, train_name, on_empty, source, bad_rows
        )
        heldout, heldout_empty = render_conversations(
            heldout, conv, heldout_name, on_empty, source, bad_rows
        )
    else:
        assert renderer is not None
        train, train_empty = render_rows(train, renderer, train_name, on_empty, source, bad_rows)
        heldout, heldout_empty = render_rows(
            heldout, renderer, heldout_name, on_empty, source, bad_rows
        )
    train_bad, heldout_bad = (
        {"dropped": counts.pop("bad"), "rows": counts.pop("bad_rows")}
        for counts in (train_empty, heldout_empty)
    )
    if conv is not None:  # what the lint says of the dropped rows
        for bad in (train_bad, heldout_bad):
            bad["why"] = "are malformed conversations"
    if len(train) == 0:
        why = (
            f"all {available:,} rendered an empty prompt or response"
            + (
                ' or printed a null, boolean, list or dict (dataset.bad_rows = "drop")'
                if train_bad["dropped"]
                else ""
            )
            if available
            else f"the split {cfg['split']!r} has no rows"
        )
        if conv is not None and available:
            why = f"all {available:,} are empty or malformed conversations"
        raise RecipeError(
            f"{where}: no training rows left after formatting ({why}); check "
            "dataset.path, dataset.split and the templates"
        )
    metrics = {
        "train_rows": len(train),
        "heldout_rows": len(heldout),
        "dropped_empty": train_empty["dropped"] + heldout_empty["dropped"],
        "dropped_bad": train_bad["dropped"] + heldout_bad["dropped"],
        "train_bad": train_bad,
        "heldout_bad": heldout_bad,
        "train_empty": train_empty,
        "heldout_empty": heldout_empty,
        "rows_available": available,
    }
    return Formatted(train, heldout, metrics, train_name)


PER_SOURCE = ("train_empty", "heldout_empty", "train_bad", "heldout_bad")


def prepare_mix(recipe: Recipe, limit: int | None = None) -> Formatted:
    """`prepare` for [[dataset.sources]]: each source formatted as a one-source recipe (its own
    shuffle with recipe.seed and its own held-out rows), its training rows drawn as
    runner/data/mixing.py counts them, then the mix shuffled with recipe.seed. The held-out rows
    are every source's, shuffled too (compare's first rows come from every source). Each row
    keeps its source's index in SOURCE."""
    from datasets import Value, concatenate_datasets

    from runner.data.mixing import mix_counts, pick

    cfg = recipe.section("dataset")
    sources = source_recipes(recipe)
    done: list[Formatted] = []
    for source in sources:
        with rekeyed(source):
            done.append(prepare(source.recipe))
    counts = mix_counts(
        [len(f.train) for f in done],
        [s.weight for s in sources],
        [s.rows for s in sources],
        cfg["max_rows"],
    )
    talks = any(MESSAGES in f.train.column_names for f in done)
    trains, helds, per_source = [], [], []
    for source, f, count in zip(sources, done, counts, strict=True):
        positions = pick(count, len(f.train))
        parts = []
        for ds in (f.train.select(positions), f.heldout):
            if talks and MESSAGES not in ds.column_names:  # a template row: no conversation
                ds = ds.add_column(MESSAGES, [""] * len(ds))
            ds = ds.add_column(SOURCE, [source.index] * len(ds))
            if ds.features[ROW] != Value("int64"):  # an empty split's column may be null
                ds = ds.cast_column(ROW, Value("int64"))
            parts.append(ds)
        trains.append(parts[0])
        helds.append(parts[1])
        per_source.append(
            {
                "source": source.label,
                "train_rows": len(positions),
                "heldout_rows": len(f.heldout),
                "available": len(f.train),
                "repeated": max(0, len(positions) - len(f.train)),
                # only what dropped rows: the lint names them per source
                **{k: f.metrics[k] for k in PER_SOURCE if f.metrics[k].get("dropped")},
            }
        )
    train = concatenate_datasets(trains)
    heldout = concatenate_datasets(helds)
    if cfg["shuffle"]:
        train = train.shuffle(seed=recipe.seed)
        heldout = heldout.shuffle(seed=recipe.seed)
    if cfg["max_rows"] and len(train) > cfg["max_rows"]:  # without weights: a cap, as before
        train = train.select(range(cfg["max_rows"]))
        kept = train[SOURCE]
        for entry in per_source:
            entry["train_rows"] = 0
        for index in kept:
            per_source[index]["train_rows"] += 1
        for entry in per_source:
            entry["repeated"] = max(0, entry["train_rows"] - entry["available"])
    if len(train) == 0:
        raise RecipeError(
            f"{recipe.origin('dataset.sources')}: $.dataset.sources: the mix has no training "
            "rows; give the sources rows, or raise their weights or rows"
        )
    available = len(train)
    if limit is not None:
        train = train.select(range(min(limit, len(train))))
        heldout = heldout.select(range(min(limit, len(heldout))))
    metrics = {
        "train_rows": len(train),
        "heldout_rows": len(heldout),
        "dropped_empty": sum(f.metrics["dropped_empty"] for f in done),
        "dropped_bad": sum(f.metrics["dropped_bad"] for f in done),
        "rows_available": available,
        "sources": per_source,
    }
    return Formatted(train, heldout, metrics, done[0].train_split)


def empty_shards(splits: dict[str, Any]) -> dict[str, int]:
    """save_to_disk writes an empty split as no shard at all, which load_from_disk cannot read
    back (heldout_rows = 0): one empty shard instead."""
    return {name: 1 for name, ds in splits.items() if len(ds) == 0}

"""The tokenize stage's data logic: input_ids and labels; the loss is on the response and its
end token only (for conversations: on the trained assistant turns, `encode_conversations`).

The prompt/response ids come from `runner.data.chat.Encoder` (template.format); it masks
the prompt (unless tokenize.train_on_prompt), applies tokenize.truncation, and counts what a
user needs to know: truncated and dropped rows, length percentiles, and the problems that make a
fine-tune silently useless (rows with every label masked, rows whose end token is not trained,
pad == eos with the eos masked, prompts longer than max_length).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from runner.data.chat import Encoder
from runner.data.collate import IGNORE_INDEX
from runner.data.conversations import MESSAGES, loads
from runner.data.formatting import ROW

SHOWN_ROWS = 5
FLAGS = (
    "length",
    "trained",
    "truncated",
    "keep",
    "all_masked",
    "end_trained",
    "eos_masked",
    "prompt_over",
    "data_special",
    "row",
)


def encode(
    prompt_ids: list[int],
    response_ids: list[int],
    max_length: int,
    truncation: str,
    train_on_prompt: bool,
    keep_prefix: int = 0,
) -> tuple[list[int], list[int], bool] | None:
    """One example; None when it must be dropped. `response_ids` end with the end token.

    cut_prompt keeps the response (and its end token) and cuts the prompt from the left, keeping
    its first `keep_prefix` tokens (bos, `[gMASK]sop`, a chat header) and at least a quarter of
    the room; only a response longer than that is cut. Returns (input_ids, labels, truncated)."""
    fitted = fit(prompt_ids, response_ids, max_length, truncation, keep_prefix)
    if fitted is None:
        return None
    prompt, response, truncated = fitted
    prompt_labels = prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
    return [*prompt, *response], [*prompt_labels, *response], truncated


def fit(
    prompt_ids: list[int],
    response_ids: list[int],
    max_length: int,
    truncation: str,
    keep_prefix: int = 0,
) -> tuple[list[int], list[int], bool] | None:
    """The prompt and response ids that fit max_length (see `encode`), and whether cut."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids, False
    if truncation == "drop":
        return None
    keep_prefix = keep_prefix if keep_prefix < max_length // 2 else 0
    prefix, body = prompt_ids[:keep_prefix], prompt_ids[keep_prefix:]
    room = max_length - len(prefix)
    keep_body = max(room - len(response_ids), min(len(body), room // 4))
    response = response_ids[: room - keep_body]
    prompt = prefix + (body[len(body) - keep_body :] if keep_body else [])
    return prompt, response, True


def percentiles(values: Any) -> dict[str, float]:
    import numpy as np

    ordered = np.sort(np.asarray(values, dtype=np.int64))
    if ordered.size == 0:
        return {}

    def at(q: float) -> float:
        return float(ordered[min(ordered.size - 1, round(q * (ordered.size - 1)))])

    return {
        "min": float(ordered[0]),
        "mean": round(float(ordered.mean()), 1),
        "std": round(float(ordered.std()), 1),  # the memory estimate's packed-row spread
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": float(ordered[-1]),
    }


def encode_batch(
    encoder: Encoder,
    cfg: dict[str, Any],
    prompts: list[str],
    responses: list[str],
    rows: list[int] | None = None,
) -> dict[str, list[Any]]:
    """input_ids, labels and the per-row flags of FLAGS for a batch of rendered rows (`rows`:
    their source row numbers, for warnings)."""
    eos = encoder.eos
    max_length = cfg["max_length"]
    out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", *FLAGS)}
    prompt_ids, response_ids = encoder.encode(prompts, responses)
    train_on_prompt = cfg["train_on_prompt"]
    numbers = rows if rows is not None else [0] * len(prompts)
    for p, r, p_text, r_text, number in zip(
        prompt_ids, response_ids, prompts, responses, numbers, strict=True
    ):
        out["data_special"].append(
            bool(
                encoder.data_specials(p_text, part="prompt")
                or encoder.data_specials(r_text, part="response")
            )
        )
        out["row"].append(number)
        fitted = fit(p, r, max_length, cfg["truncation"], encoder.prefix_length(p))
        prompt, response, truncated = fitted if fitted else ([], [], True)
        ids = prompt + response
        trained = len(ids) if train_on_prompt else len(response)
        end_trained = eos in response or (train_on_prompt and eos in prompt)
        out["input_ids"].append(ids)
        out["labels"].append(ids if train_on_prompt else [IGNORE_INDEX] * len(prompt) + response)
        out["length"].append(len(ids))
        out["trained"].append(trained)
        out["truncated"].append(truncated)
        out["keep"].append(fitted is not None)
        out["all_masked"].append(fitted is not None and trained == 0)
        out["end_trained"].append(end_trained)
        out["eos_masked"].append(fitted is not None and not end_trained and eos in prompt)
        out["prompt_over"].append(len(p) >= max_length)
    return out


def fit_turns(
    ids: list[int], trained: list[bool], max_length: int, truncation: str, keep_prefix: int = 0
) -> tuple[list[int], list[bool], bool] | None:
    """A conversation that fits max_length as `fit` fits a prompt and response: the last trained
    turn (and what follows it) is the response, everything before it the prompt, whose masks
    travel with its tokens. Returns (ids, trained, truncated)."""
    start = last_turn_start(trained)
    fitted = fit(
        list(range(start)), list(range(start, len(ids))), max_length, truncation, keep_prefix
    )
    if fitted is None:
        return None
    prompt, response, truncated = fitted
    keep = prompt + response
    return [ids[i] for i in keep], [trained[i] for i in keep], truncated


def last_turn_start(trained: list[bool]) -> int:
    """Where the last run of trained tokens starts (the length of its "prompt")."""
    trained_at = [i for i, t in enumerate(trained) if t]
    start = trained_at[-1] if trained_at else len(trained)
    while start > 0 and trained[start - 1]:
        start -= 1
    return start


def encode_conversations(
    encoder: Encoder, cfg: dict[str, Any], conversations: list[str], rows: list[int] | None = None
) -> dict[str, list[Any]]:
    """`encode_batch` for conversation rows (their MESSAGES JSON): every turn rendered through
    the format, the trained turns' tokens as labels (every token with train_on_prompt)."""
    eos = encoder.eos
    max_length = cfg["max_length"]
    train_on_prompt = cfg["train_on_prompt"]
    out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", *FLAGS)}
    numbers = rows if rows is not None else [0] * len(conversations)
    for text, number in zip(conversations, numbers, strict=True):
        messages = loads(text)
        full_ids, full_trained = encoder.conversation(messages, f"row {number}")
        fitted = fit_turns(
            full_ids, full_trained, max_length, cfg["truncation"], encoder.prefix_length(full_ids)
        )
        ids, trained, truncated = fitted if fitted else ([], [], True)
        if train_on_prompt:
            trained = [True] * len(ids)
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained, strict=True)]
        end_trained = any(i == eos and t for i, t in zip(ids, trained, strict=True))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["trained"].append(sum(trained))
        out["truncated"].append(truncated)
        out["keep"].append(fitted is not None)
        out["all_masked"].append(fitted is not None and not any(trained))
        out["end_trained"].append(end_trained)
        out["eos_masked"].append(fitted is not None and not end_trained and eos in ids)
        out["prompt_over"].append(last_turn_start(full_trained) >= max_length)
        out["data_special"].append(
            any(encoder.data_specials(m["content"], [(0, len(m["content"]))]) for m in messages)
        )
        out["row"].append(number)
    return out


def encode_rows(
    encoder: Encoder, cfg: dict[str, Any], batch: dict[str, list[Any]]
) -> dict[str, list[Any]]:
    """Formatted rows encoded: conversations (MESSAGES) turn by turn, prompt/response rows as
    pairs; a [[dataset.sources]] mix has both (a pair's MESSAGES is empty), each row encoded as
    its source trained it, in order."""
    rows = batch.get(ROW)
    if MESSAGES not in batch:
        return encode_batch(encoder, cfg, batch["prompt"], batch["response"], rows)
    talks = [bool(m) for m in batch[MESSAGES]]
    if all(talks):
        return encode_conversations(encoder, cfg, batch[MESSAGES], rows)
    numbers = rows if rows is not None else [0] * len(talks)
    conv_at = [i for i, t in enumerate(talks) if t]
    pair_at = [i for i, t in enumerate(talks) if not t]
    convs = encode_conversations(
        encoder, cfg, [batch[MESSAGES][i] for i in conv_at], [numbers[i] for i in conv_at]
    )
    pairs = encode_batch(
        encoder,
        cfg,
        [batch["prompt"][i] for i in pair_at],
        [batch["response"][i] for i in pair_at],
        [numbers[i] for i in pair_at],
    )
    out: dict[str, list[Any]] = {k: [None] * len(talks) for k in convs}
    for encoded, at in ((convs, conv_at), (pairs, pair_at)):
        for key in out:
            for j, i in enumerate(at):
                out[key][i] = encoded[key][j]
    return out


def summarize(mapped: Any) -> dict[str, Any]:
    """Counts and length percentiles from the flag columns (Arrow compute, no Python loop)."""
    import numpy as np

    def col(name: str) -> Any:
        return np.asarray(mapped.data.column(name).to_numpy(zero_copy_only=False))

    keep = col("keep").astype(bool)
    lengths = col("length")[keep]
    return {
        "rows": int(keep.sum()),
        "truncated": int((col("truncated").astype(bool) & keep).sum()),
        "dropped": int((~keep).sum()),
        "tokens": int(lengths.sum()),
        "trained_tokens": int(col("trained")[keep].sum()),
        "length": percentiles(lengths),
        "all_masked": int(col("all_masked").sum()),
        "no_end_token": int((~col("end_trained").astype(bool) & keep).sum()),
        "eos_masked": int(col("eos_masked").sum()),
        "prompt_over_max": int(col("prompt_over").sum()),
        "special_text": int(col("data_special").astype(bool).sum()),
        "special_rows": [int(n) for n in col("row")[col("data_special").astype(bool)][:SHOWN_ROWS]],
    }


def tokenize_split(
    ds: Any, encoder: Encoder, cfg: dict[str, Any], num_proc: int = 1
) -> tuple[Any, dict[str, Any]]:
    """The kept rows (input_ids, labels) and their counts."""
    import numpy as np

    def enc(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return encode_rows(encoder, cfg, batch)

    if len(ds) == 0:  # map would return no columns at all
        from datasets import Dataset, Features, Sequence, Value

        ids = Sequence(Value("int64"))
        empty = Dataset.from_dict(
            {"input_ids": [], "labels": []}, features=Features({"input_ids": ids, "labels": ids})
        )
        return empty, {
            "rows": 0,
            "truncated": 0,
            "dropped": 0,
            "tokens": 0,
            "trained_tokens": 0,
            "length": {},
            "all_masked": 0,
            "no_end_token": 0,
            "eos_masked": 0,
            "prompt_over_max": 0,
            "special_text": 0,
            "special_rows": [],
        }
    with rust_threads(num_proc == 1):
        mapped = ds.map(
            enc,
            batched=True,
            remove_columns=ds.column_names,
            num_proc=min(num_proc, len(ds)) if num_proc > 1 else None,
            load_from_cache_file=False,
            desc="tokenize",
        )
    stats = summarize(mapped)
    if stats["dropped"]:
        keep = np.flatnonzero(np.asarray(mapped.data.column("keep").to_numpy(zero_copy_only=False)))
        mapped = mapped.select(keep)
    return mapped.remove_columns(list(FLAGS)), stats


@contextlib.contextmanager
def rust_threads(enabled: bool) -> Iterator[None]:
    """Let a fast tokenizer encode each batch on every core (in one process: with num_proc > 1
    datasets forks, and the tokenizers library must stay single-threaded there)."""
    name = "TOKENIZERS_PARALLELISM"
    environ = os.environ
    before = environ.get(name)
    if enabled:
        environ[name] = "true"
    try:
        yield
    finally:
        # datasets' map(num_proc=N) ends by putting a copy of the environment in place of
        # os.environ, so whatever read `os.environ` before (rich's consoles) would see a stale
        # one from then on: the process keeps its own object
        os.environ = environ  # noqa: B003 (the same object back, not a new environment)
        if before is None:
            environ.pop(name, None)
        else:
            environ[name] = before


def tokenizer_facts(tok: Any) -> dict[str, Any]:
    return {
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "pad_is_eos": tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id,
        "padding_side": tok.padding_side,
    }

"""The format and tokenize stages' metrics as lines a person reads (`recipe status`). No torch."""

from __future__ import annotations

from typing import Any

from runner.data.lint import format_warnings, tokenize_warnings


def _length(length: dict[str, float]) -> str:
    if not length:
        return "no rows"
    keys = ("min", "p50", "p90", "p99", "max")
    return " ".join(f"{k} {length[k]:,.0f}" for k in keys if k in length)


def format_lines(metrics: dict[str, Any]) -> list[str]:
    lines = [
        f"rows: {metrics.get('train_rows', 0):,} train, {metrics.get('heldout_rows', 0):,} "
        f"held out; {metrics.get('dropped_empty', 0):,} dropped for an empty prompt or "
        "response"
    ]
    lines += source_lines(metrics)
    return lines + [f"warning: {w}" for w in format_warnings(metrics)]


def mix_plan_lines(sources: list[dict[str, Any]], metrics: dict[str, Any] | None) -> list[str]:
    """`recipe plan` for a [[dataset.sources]] mix: what the last format run drew from each
    source when it is current (`metrics`), else what each source asks for."""
    if metrics and len(metrics.get("sources") or []) == len(sources):
        return source_lines(metrics)
    total = sum(float(s.get("weight", 0)) for s in sources)
    out = []
    for i, s in enumerate(sources):
        if "weight" in s:
            ask = f"weight {s['weight']:g} ({100 * float(s['weight']) / total:.1f}% of the mix)"
        elif "rows" in s:
            ask = f"{s['rows']:,} rows"
        else:
            ask = "all its rows"
        out.append(f"source {i} {s['path']}: {ask}")
    return out


def source_lines(metrics: dict[str, Any]) -> list[str]:
    """A mix ([[dataset.sources]]): the rows each source gave."""
    out = []
    train = max(int(metrics.get("train_rows", 0)), 1)
    for i, s in enumerate(metrics.get("sources") or []):
        repeated = f", {s['repeated']:,} repeated" if s.get("repeated") else ""
        out.append(
            f"source {i} {s['source']}: {s['train_rows']:,} train "
            f"({100 * s['train_rows'] / train:.1f}%{repeated}) of {s['available']:,}, "
            f"{s['heldout_rows']:,} held out"
        )
    return out


def tokenize_lines(metrics: dict[str, Any], params: dict[str, Any]) -> list[str]:
    lines = []
    for split in ("train", "heldout"):
        m = metrics.get(split)
        if not isinstance(m, dict) or "rows" not in m:
            continue
        lines.append(
            f"{split}: {m['rows']:,} rows, {m.get('tokens', 0):,} tokens "
            f"({m.get('trained_tokens', 0):,} trained); "
            f"truncated {m.get('truncated', 0):,}, dropped {m.get('dropped', 0):,}; "
            f"length {_length(m.get('length') or {})}"
        )
    cfg = {
        "max_length": params.get("tokenize.max_length", "?"),
        "truncation": params.get("tokenize.truncation", "cut_prompt"),
    }
    return lines + [f"warning: {w}" for w in tokenize_warnings(metrics, cfg)]


def metric_lines(stage: str, metrics: dict[str, Any], params: dict[str, Any]) -> list[str] | None:
    """Readable lines for the data stages and train; None for the others (shown as JSON)."""
    if stage == "format" and "train_rows" in metrics:
        return format_lines(metrics)
    if stage == "tokenize" and isinstance(metrics.get("train"), dict):
        return tokenize_lines(metrics, params)
    if stage == "train" and "global_step" in metrics:
        return train_lines(metrics)
    return None


def train_lines(m: dict[str, Any]) -> list[str]:
    """`steps: 150, loss 0.5302 -> 0.3974 (resumed from checkpoint-2)`, throughput, memory."""

    def loss(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, (int, float)) else "-"

    resumed = f" (resumed from {m['resumed_from']})" if m.get("resumed_from") else ""
    lines = [
        f"steps: {m['global_step']}, loss {loss(m.get('first_logged_loss'))} -> "
        f"{loss(m.get('last_logged_loss'))}{resumed}"
    ]
    where = f"{m['processes']} processes" if m.get("processes") else "1 process"
    if "real_tokens_per_second" in m:
        per = m.get("real_tokens_per_second_per_process")
        each = f" ({', '.join(f'{x:,.0f}' for x in per)} per process)" if per else ""
        lines.append(
            f"throughput: {m['real_tokens_per_second']:,.0f} real tokens/s{each}, "
            f"{m.get('seconds_per_step', 0):.3f} s/step over {m.get('steady_steps')} steady "
            f"steps, {where}"
        )
    else:
        lines.append(f"throughput: {m.get('average_tokens_per_second', 0):,.0f} tokens/s, {where}")
    memory = [
        f"{label} {m[key]:.2f} GiB"
        for key, label in (
            ("peak_allocated_gib", "peak allocated"),
            ("peak_reserved_gib", "peak reserved"),
            ("peak_rss_gib", "peak RSS"),
        )
        if key in m
    ]
    if memory:
        lines.append(f"memory (largest process): {', '.join(memory)}")
    return lines

"""report.html: one self-contained page per run (no scripts, no external resources): the recipe
summary, the training loss curve (matplotlib PNG, base64), the metrics before/after and the
side-by-side generations. Every text that comes from data is HTML-escaped."""

from __future__ import annotations

import base64
import io
import json
from html import escape
from typing import Any

from runner.report.metrics import NAMES

LOWER_IS_BETTER = ("held-out loss", "held-out perplexity")
NO_REFERENCE = '<span class="note">(extra prompt, no reference)</span>'
# No scripts, no fetches: the page shows data from the run and nothing else.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
SUBTITLE = (
    "Before / after fine-tuning: the base model (adapter disabled) and the fine-tuned "
    "one, same prompts, same decoding."
)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", sans-serif;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.sub { color: #59636e; margin-top: 0; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; }
th, td { border: 1px solid #d1d9e0; padding: .35rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
table.kv { width: auto; } table.kv th { width: 14rem; }
table.metrics { width: auto; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { background: #dafbe1; } td.worse { background: #ffebe9; }
table.examples td { white-space: pre-wrap; word-break: break-word; width: 25%; }
.scores { display: block; color: #59636e; font-size: .85em; margin-top: .3rem;
          white-space: normal; }
img.curve { max-width: 100%; border: 1px solid #d1d9e0; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; }
.note { color: #59636e; font-style: italic; }
"""


def loss_points(history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) pairs from the Trainer's log_history: training loss and, if any, eval loss."""
    out: dict[str, list[tuple[float, float]]] = {"train": [], "eval": []}
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        if "loss" in entry:
            out["train"].append((float(step), float(entry["loss"])))
        if "eval_loss" in entry:
            out["eval"].append((float(step), float(entry["eval_loss"])))
    return out


def loss_curve_png(history: list[dict[str, Any]]) -> bytes | None:
    """The loss curve as PNG bytes; None when the history has no loss."""
    points = loss_points(history)
    if not points["train"] and not points["eval"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax = fig.subplots()
    for key, label, style in (("train", "training loss", "-o"), ("eval", "eval loss", "-s")):
        if points[key]:
            xs, ys = zip(*points[key], strict=True)
            ax.plot(xs, ys, style, markersize=3, linewidth=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def recipe_summary(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The settings a reader of the report wants first, from the resolved recipe data."""

    def get(dotted: str) -> Any:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    q = "none"
    if get("quantization.load_in_4bit"):
        q = (
            f"4-bit {get('quantization.bnb_4bit_quant_type')}"
            f"{', double quant' if get('quantization.bnb_4bit_use_double_quant') else ''}, "
            f"compute {get('quantization.bnb_4bit_compute_dtype')}"
        )
    elif get("quantization.load_in_8bit"):
        q = "8-bit"
    decoding = (
        "greedy"
        if not get("compare.do_sample")
        else (
            f"sampling (temperature {_fmt(get('compare.temperature'))}, "
            f"top_p {_fmt(get('compare.top_p'))}, seed {_fmt(get('recipe.seed'))})"
        )
    )
    pairs = [
        ("recipe", get("recipe.name")),
        ("model", get("model.name_or_path")),
        (
            "dataset",
            f"{get('dataset.path')} (split {get('dataset.split')})"
            if not get("dataset.sources")
            else "; ".join(
                f"{s.get('path')} (weight {s['weight']})" if "weight" in s else str(s.get("path"))
                for s in get("dataset.sources")
            ),
        ),
        ("quantization", q),
        (
            "LoRA",
            f"r {get('lora.r')}, alpha {get('lora.lora_alpha')}, "
            f"dropout {_fmt(get('lora.lora_dropout'))}, "
            f"targets {_fmt(get('lora.target_modules'))}",
        ),
        (
            "training",
            f"lr {_fmt(get('train.learning_rate'))} ({get('train.lr_scheduler_type')}), "
            f"batch {get('train.per_device_train_batch_size')} x "
            f"{get('train.gradient_accumulation_steps')}, "
            f"max_steps {get('train.max_steps')}, "
            f"epochs {_fmt(get('train.num_train_epochs'))}, "
            f"optim {get('train.optim')}",
        ),
        (
            "compare",
            f"{_count(get('compare.num_examples') or 0, 'held-out example')}, "
            f"{_count(len(get('compare.prompts') or []), 'extra prompt')}, {decoding}, "
            f"max_new_tokens {get('compare.max_new_tokens')}",
        ),
    ]
    return [(k, _fmt(v)) for k, v in pairs if v is not None]


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, before, after) for the overlap metrics and the held-out loss."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    rows: list[tuple[str, Any, Any]] = [
        (NAMES.get(k, k), v, after.get(k))
        for k, v in before.items()  # the recipe's order
    ]
    loss = summary.get("heldout_loss")
    if loss:
        rows.append(("held-out loss", loss["before"], loss["after"]))
        rows.append(("held-out perplexity", loss["before_ppl"], loss["after_ppl"]))
    return rows


def _metrics_table(summary: dict[str, Any]) -> str:
    rows = metric_rows(summary)
    if not rows:
        return '<p class="note">No held-out rows with references were scored.</p>'
    out = [
        '<table class="metrics"><tr><th>metric</th><th>before</th><th>after</th>'
        "<th>change</th></tr>"
    ]
    for name, b, a in rows:
        cls = ""
        change = ""
        if isinstance(a, int | float) and isinstance(b, int | float):
            delta = a - b
            change = f"{delta:+.2f}"
            gain = -delta if name in LOWER_IS_BETTER else delta
            cls = "better" if gain > 0 else "worse" if gain < 0 else ""
        out.append(
            f'<tr><td>{escape(name)}</td><td class="num">{escape(_fmt(b))}</td>'
            f'<td class="num {cls}">{escape(_fmt(a))}</td>'
            f'<td class="num">{escape(change)}</td></tr>'
        )
    out.append("</table>")
    seg = summary.get("segmentation")
    how = {
        "jieba": "ROUGE on jieba words, BLEU-4 on characters (as ChatGLM3's AdvertiseGen demo)",
        "char": "BLEU-4 and ROUGE on characters (a script written without spaces)",
        "words": "BLEU-4 by sacreBLEU (13a tokens), ROUGE on lowercased words",
    }
    if seg:
        notes = "; ".join(how.get(s, s) for s in seg.split("+"))
        n = summary.get("scored_examples", 0)
        out.append(
            f'<p class="note">{n} scored example{"" if n == 1 else "s"}; '
            f"{escape(notes)}; scores 0-100 (ROUGE: F1), loss lower is better.</p>"
        )
    return "\n".join(out)


def _scores(s: dict[str, Any] | None) -> str:
    if not s:
        return ""
    text = " · ".join(f"{k} {_fmt(v)}" for k, v in s.items())
    return f'<span class="scores">{escape(text)}</span>'


def _examples_table(rows: list[dict[str, Any]]) -> str:
    out = [
        '<table class="examples"><tr><th>prompt</th><th>reference</th>'
        "<th>before (base)</th><th>after (fine-tuned)</th></tr>"
    ]
    for r in rows:
        ref = r.get("reference")
        out.append(
            f"<tr><td>{escape(r['prompt'])}</td>"
            f"<td>{escape(ref) if ref else NO_REFERENCE}</td>"
            f"<td>{escape(r['before'])}{_scores(r.get('before_scores'))}</td>"
            f"<td>{escape(r['after'])}{_scores(r.get('after_scores'))}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def render(
    *,
    title: str,
    summary_pairs: list[tuple[str, str]],
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    resolved_toml: str | None = None,
    train_metrics: dict[str, Any] | None = None,
) -> str:
    """The whole page as a string."""
    png = loss_curve_png(history)
    if png:
        curve = (
            f'<img class="curve" alt="training loss by step" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        )
    else:
        curve = '<p class="note">No loss was logged (train/log_history.json missing or empty).</p>'
    kv = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in summary_pairs)
    if train_metrics:
        picked = {
            k: train_metrics[k]
            for k in ("global_step", "train_loss", "seconds")
            if k in train_metrics
        }
        kv += "".join(
            f"<tr><th>train: {escape(k)}</th><td>{escape(_fmt(v))}</td></tr>"
            for k, v in picked.items()
        )
    toml = (
        f"<details><summary>resolved recipe</summary><pre>{escape(resolved_toml)}</pre></details>"
        if resolved_toml
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<p class="sub">{SUBTITLE}</p>
<h2>Recipe</h2>
<table class="kv">{kv}</table>
{toml}
<h2>Loss curve</h2>
{curve}
<h2>Held-out metrics</h2>
{_metrics_table(summary)}
<h2>Generations</h2>
{_examples_table(rows)}
</body>
</html>
"""

"""Text-overlap metrics for compare: BLEU-4 and ROUGE-1/2/L, each 0..100.

Chinese references are scored the way ChatGLM3's own demo scores AdvertiseGen: ROUGE on jieba
words, BLEU-4 on characters. Other languages are scored on characters for both (whitespace
left out), so no word segmenter or tokenizer for that language is needed. Maintained libraries
(jieba, nltk, rouge-chinese) do the math.
"""

from __future__ import annotations

import re
from typing import Any

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def segmentation(reference: str) -> str:
    """ "jieba" when the reference contains Chinese characters, else "char"."""
    return "jieba" if HAN.search(reference) else "char"


def _jieba_words(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(text) if w.strip()]


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _rouge(pred: list[str], ref: list[str]) -> tuple[float, float, float]:
    from rouge_chinese import Rouge

    if not pred or not ref:
        return 0.0, 0.0, 0.0
    try:
        got = Rouge().get_scores(" ".join(pred), " ".join(ref))[0]
    except ValueError:  # nothing left after the library's sentence split
        return 0.0, 0.0, 0.0
    return got["rouge-1"]["f"], got["rouge-2"]["f"], got["rouge-l"]["f"]


def _bleu4(pred: list[str], ref: list[str]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not pred or not ref:
        return 0.0
    return float(sentence_bleu([ref], pred, smoothing_function=SmoothingFunction().method3))


def scores(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F1 of one prediction against its reference, each 0..100."""
    if segmentation(reference) == "jieba":
        pred_tokens, ref_tokens = _jieba_words(prediction), _jieba_words(reference)
        pred_chars, ref_chars = list(prediction), list(reference)  # as ChatGLM3's demo
    else:
        pred_tokens, ref_tokens = _chars(prediction), _chars(reference)
        pred_chars, ref_chars = pred_tokens, ref_tokens
    r1, r2, rl = _rouge(pred_tokens, ref_tokens)
    bleu = _bleu4(pred_chars, ref_chars)
    return {
        "bleu-4": round(100 * bleu, 2),
        "rouge-1": round(100 * r1, 2),
        "rouge-2": round(100 * r2, 2),
        "rouge-l": round(100 * rl, 2),
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in rows[0]}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if r.get("reference")]
    segmented = sorted({segmentation(r["reference"]) for r in scored})
    return {
        "before": mean_scores([r["before_scores"] for r in scored]),
        "after": mean_scores([r["after_scores"] for r in scored]),
        "scored_examples": len(scored),
        "segmentation": "+".join(segmented),
    }

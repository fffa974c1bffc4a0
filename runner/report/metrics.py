"""Text-overlap metrics for compare: BLEU-4 and ROUGE-1/2/L, scored the way ChatGLM3's demo scores
AdvertiseGen (ROUGE on jieba words, BLEU-4 on characters). Maintained libraries do the math."""

from __future__ import annotations

from typing import Any


def _words(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(text) if w.strip()]


def scores(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F1, each 0..100."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    pred_words, ref_words = _words(prediction), _words(reference)
    bleu = sentence_bleu([list(reference)], list(prediction),
                         smoothing_function=SmoothingFunction().method3) if prediction else 0.0
    if pred_words and ref_words:
        rouge = Rouge().get_scores(" ".join(pred_words), " ".join(ref_words))[0]
        r1, r2, rl = (rouge[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l"))
    else:
        r1 = r2 = rl = 0.0
    return {"bleu-4": round(100 * bleu, 2), "rouge-1": round(100 * r1, 2),
            "rouge-2": round(100 * r2, 2), "rouge-l": round(100 * rl, 2)}


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in rows[0]}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if r.get("reference")]
    return {"before": mean_scores([r["before_scores"] for r in scored]),
            "after": mean_scores([r["after_scores"] for r in scored]),
            "scored_examples": len(scored)}

"""Text-overlap metrics for compare, each 0..100, chosen by `compare.metrics`.

Each reference is scored by its script, so that text in one language is never scored by the
rules of another:
- Chinese ("jieba"): as ChatGLM3's own demo scores AdvertiseGen: ROUGE on jieba words, BLEU-4 on
  characters (nltk, smoothing method 3). These figures are the ones the runner always reported.
- scripts written without spaces between words (Japanese kana, Thai, Lao, Khmer, Myanmar,
  Tibetan: "char"): ROUGE and BLEU-4 on characters, whitespace left out, since a word split
  needs a segmenter for that language.
- everything else, written with spaces between words ("words"): sacreBLEU's sentence BLEU
  (its standard 13a tokens, case kept) and ROUGE on words (13a tokens, lowercased, tokens
  without a letter or digit left out, as Google's rouge-score does). Counting characters here
  would reward any text in the same alphabet: `qwerty zxcv` shares letters with
  `garden candle river` but no word.
chrF (sacreBLEU's default: character n-grams up to 6, whitespace left out) and exact match (equal
after collapsing whitespace) are computed the same way for every script.
Maintained libraries (jieba, nltk, rouge-chinese, sacrebleu) do the math.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Kana, Thai, Lao, Tibetan, Myanmar, Khmer: scripts that do not separate words by spaces. Kana
# first: Japanese mixes kana with Han characters, and jieba would split it as Chinese.
UNSPACED = re.compile(
    r"[\u3040-\u30ff\u31f0-\u31ff\u0e00-\u0e7f\u0e80-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff]"
)
METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "chrf", "exact_match")
DEFAULT_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
ROUGE = ("rouge-1", "rouge-2", "rouge-l")
NAMES = {
    "bleu-4": "BLEU-4",
    "rouge-1": "ROUGE-1",
    "rouge-2": "ROUGE-2",
    "rouge-l": "ROUGE-L",
    "chrf": "chrF",
    "exact_match": "exact match",
}


def segmentation(reference: str) -> str:
    """How a reference is split for ROUGE and BLEU: "jieba", "char" or "words" (module doc)."""
    if UNSPACED.search(reference):
        return "char"
    return "jieba" if HAN.search(reference) else "words"


def _jieba_words(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(text) if w.strip()]


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


@cache
def _tokenizer_13a() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def _words(text: str) -> list[str]:
    """ROUGE's words: sacreBLEU's 13a tokens (punctuation split off), lowercased, tokens that are
    punctuation alone left out."""
    return [w for w in _tokenizer_13a()(text.lower()).split() if any(ch.isalnum() for ch in w)]


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


@cache
def _sacre(name: str) -> Any:
    from sacrebleu.metrics import BLEU, CHRF

    # sentence scores: effective order, so a short answer is not zeroed for lacking 4-grams
    return BLEU(effective_order=True) if name == "bleu" else CHRF()


def _sacre_score(name: str, prediction: str, reference: str) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_sacre(name).sentence_score(prediction, [reference]).score) / 100


def _exact(prediction: str, reference: str) -> float:
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def scores(
    prediction: str, reference: str, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS
) -> dict[str, float]:
    """The chosen metrics of one prediction against its reference, each 0..100, in the order
    asked (ROUGE as F1)."""
    seg = segmentation(reference)
    got: dict[str, float] = {}
    if any(m in ROUGE for m in metrics):
        if seg == "jieba":
            tokens = _jieba_words(prediction), _jieba_words(reference)
        elif seg == "char":
            tokens = _chars(prediction), _chars(reference)
        else:
            tokens = _words(prediction), _words(reference)
        got.update(zip(ROUGE, _rouge(*tokens), strict=True))
    if "bleu-4" in metrics:
        if seg == "jieba":  # characters as ChatGLM3's demo, whitespace kept
            got["bleu-4"] = _bleu4(list(prediction), list(reference))
        elif seg == "char":
            got["bleu-4"] = _bleu4(_chars(prediction), _chars(reference))
        else:
            got["bleu-4"] = _sacre_score("bleu", prediction, reference)
    if "chrf" in metrics:
        got["chrf"] = _sacre_score("chrf", prediction, reference)
    if "exact_match" in metrics:
        got["exact_match"] = _exact(prediction, reference)
    return {m: round(100 * got[m], 2) for m in metrics}


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

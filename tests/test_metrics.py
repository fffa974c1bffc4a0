"""The compare metrics on hand-made strings, with values worked out by hand."""

from __future__ import annotations

import pytest

from runner.report.metrics import scores, segmentation, summary

ZERO = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
PERFECT = {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("这条裙子很好看", "jieba"),
        ("A字裙, red", "jieba"),  # any Chinese character: jieba words
        ("A red dress that fits well.", "char"),
        ("Обычное платье", "char"),
        ("", "char"),
    ],
)
def test_segmentation_follows_the_reference_language(reference: str, expected: str) -> None:
    assert segmentation(reference) == expected


def test_character_scores_for_non_chinese_text() -> None:
    # characters a b c d vs a b c e:
    # ROUGE-1 3/4 both ways -> 75; bigrams {ab, bc, cd} vs {ab, bc, ce} -> 2/3; LCS abc -> 75;
    # BLEU-4 precisions 3/4, 2/3, 1/2 and 0/1 smoothed to 1/2 (method3), no brevity penalty:
    # (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.125 ** 0.25 = 0.5946
    assert scores("abcd", "abce") == {
        "bleu-4": 59.46,
        "rouge-1": 75.0,
        "rouge-2": 66.67,
        "rouge-l": 75.0,
    }


def test_character_scores_ignore_whitespace() -> None:
    assert scores("a b  c\nd", "abce") == scores("abcd", "abce")
    assert scores("red dress", "reddress") == PERFECT


def test_chinese_rouge_is_on_jieba_words_and_bleu_on_characters() -> None:
    # jieba: 我/爱/北京/天安门 vs 我/爱/北京 -> ROUGE-1 P 3/4, R 1 -> F1 6/7 = 85.71,
    # bigrams 2/3 and 2/2 -> 80; on characters ROUGE-1 would be 8/11 = 72.73.
    # BLEU-4 on characters: (4/7 * 3/6 * 2/5 * 1/4) ** (1/4) = 0.4111
    assert scores("我爱北京天安门", "我爱北京") == {
        "bleu-4": 41.11,
        "rouge-1": 85.71,
        "rouge-2": 80.0,
        "rouge-l": 85.71,
    }


@pytest.mark.parametrize("text", ["这条红色连衣裙很显瘦。", "A plain sentence."])
def test_identical_text_scores_100(text: str) -> None:
    assert scores(text, text) == PERFECT


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("", "这条裙子很好看"),
        ("   ", "abc"),
        ("...", "hello"),
        ("xyz", "abc"),
    ],
)
def test_empty_or_disjoint_predictions_score_zero(prediction: str, reference: str) -> None:
    assert scores(prediction, reference) == ZERO


def test_summary_averages_scored_rows_and_names_the_segmentation() -> None:
    rows = [
        {
            "reference": "abce",
            "before_scores": scores("xyz", "abce"),
            "after_scores": scores("abcd", "abce"),
        },
        {
            "reference": "我爱北京",
            "before_scores": scores("", "我爱北京"),
            "after_scores": scores("我爱北京", "我爱北京"),
        },
        {"reference": None, "before": "unscored", "after": "unscored"},
    ]
    got = summary(rows)
    assert got["scored_examples"] == 2
    assert got["segmentation"] == "char+jieba"
    assert got["before"] == ZERO
    assert got["after"] == {"bleu-4": 79.73, "rouge-1": 87.5, "rouge-2": 83.34, "rouge-l": 87.5}

"""The compare metrics on hand-made strings, with values worked out by hand. The Chinese figures
are literal: they are what the runner reported before references were scored by their script."""

from __future__ import annotations

import pytest

from runner.report.metrics import METRICS, scores, segmentation, summary

ZERO = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
PERFECT = {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("这条裙子很好看", "jieba"),
        ("A字裙, red", "jieba"),  # any Chinese character: jieba words
        ("A red dress that fits well.", "words"),
        ("Обычное платье", "words"),
        ("빨간 원피스", "words"),  # Hangul is written with spaces
        ("赤いドレス", "char"),  # kana: Japanese, not jieba's Chinese
        ("ชุดสีแดง", "char"),  # Thai: no spaces between words
        ("", "words"),
    ],
)
def test_segmentation_follows_the_reference_language(reference: str, expected: str) -> None:
    assert segmentation(reference) == expected


def test_character_scores_for_scripts_without_spaces() -> None:
    # characters あいうえ vs あいうお (as a b c d vs a b c e):
    # ROUGE-1 3/4 both ways -> 75; bigrams {ab, bc, cd} vs {ab, bc, ce} -> 2/3; LCS abc -> 75;
    # BLEU-4 precisions 3/4, 2/3, 1/2 and 0/1 smoothed to 1/2 (method3), no brevity penalty:
    # (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.125 ** 0.25 = 0.5946
    assert scores("あいうえ", "あいうお") == {
        "bleu-4": 59.46,
        "rouge-1": 75.0,
        "rouge-2": 66.67,
        "rouge-l": 75.0,
    }


def test_character_scores_ignore_whitespace() -> None:
    assert scores("あ い  う\nえ", "あいうお") == scores("あいうえ", "あいうお")
    assert scores("赤い ドレス", "赤いドレス") == PERFECT


def test_space_separated_text_is_scored_on_words() -> None:
    # words the red dress vs a red dress (ROUGE lowercases, drops the full stop):
    # ROUGE-1 2/3 both ways; bigrams {the red, red dress} vs {a red, red dress}: 1/2; LCS 2/3.
    # sacreBLEU 13a tokens The red dress . vs A red dress . : precisions 3/4, 2/3, 1/2 and 0/1
    # smoothed to 1/2 ("exp"), no brevity penalty: (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.5946
    assert scores("The red dress.", "A red dress.") == {
        "bleu-4": 59.46,
        "rouge-1": 66.67,
        "rouge-2": 50.0,
        "rouge-l": 66.67,
    }


def test_unrelated_words_in_the_same_alphabet_score_zero() -> None:
    # per character these shared letters once gave ROUGE-1 40
    got = scores("qwerty zxcv", "garden candle river", METRICS)
    assert {k: v for k, v in got.items() if k != "chrf"} == {
        "bleu-4": 0.0,
        "rouge-1": 0.0,
        "rouge-2": 0.0,
        "rouge-l": 0.0,
        "exact_match": 0.0,
    }
    assert got["chrf"] < 10  # character n-grams: a few shared letters, nothing more


def test_english_gibberish_scores_near_zero_and_a_copy_100() -> None:
    reference = (
        "A light cotton dress with a fitted waist and a short hem, cool enough for summer "
        "evenings and smart enough for the office."
    )
    gibberish = "ientherinde of thest ane whe thoue fol the andres wath"
    got = scores(gibberish, reference, METRICS)
    assert got["rouge-l"] < 10
    assert got["rouge-1"] < 10 and got["bleu-4"] < 10 and got["exact_match"] == 0.0
    assert scores(reference, reference, METRICS) == dict.fromkeys(METRICS, 100.0)
    # exact match ignores how whitespace is laid out, nothing else
    assert scores(" A  b\n", "A b", ["exact_match"]) == {"exact_match": 100.0}
    assert scores("a b", "A b", ["exact_match"]) == {"exact_match": 0.0}


def test_metrics_come_in_the_order_asked() -> None:
    got = scores("我爱北京天安门", "我爱北京", ["rouge-l", "chrf", "bleu-4"])
    assert list(got) == ["rouge-l", "chrf", "bleu-4"]
    assert got["rouge-l"] == 85.71 and got["bleu-4"] == 41.11  # as with the default four


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


@pytest.mark.parametrize(
    "text", ["这条红色连衣裙很显瘦。", "A plain sentence.", "赤いドレス", "Обычное платье."]
)
def test_identical_text_scores_100(text: str) -> None:
    assert scores(text, text) == PERFECT


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("", "这条裙子很好看"),
        ("   ", "abc"),
        ("...", "hello"),
        ("xyz", "abc"),
        ("ab", "abc"),  # words: a different word, however close its letters
        ("かき", "あい"),
    ],
)
def test_empty_or_disjoint_predictions_score_zero(prediction: str, reference: str) -> None:
    assert scores(prediction, reference) == ZERO


def test_summary_averages_scored_rows_and_names_the_segmentation() -> None:
    rows = [
        {
            "reference": "あいうお",
            "before_scores": scores("かき", "あいうお"),
            "after_scores": scores("あいうえ", "あいうお"),
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
    rows.append(
        {
            "reference": "a red dress",
            "before_scores": scores("qwerty", "a red dress"),
            "after_scores": scores("qwerty", "a red dress"),
        }
    )
    assert summary(rows)["segmentation"] == "char+jieba+words"
    rows.pop()
    assert got["before"] == ZERO
    assert got["after"] == {"bleu-4": 79.73, "rouge-1": 87.5, "rouge-2": 83.34, "rouge-l": 87.5}

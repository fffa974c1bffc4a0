"""Tests for the synthetic AdvertiseGen demo data (no torch needed)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from runner.data import demo

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "adgen-demo"


def parse_content(content: str) -> list[tuple[str, str]]:
    pairs = [item.split("#") for item in content.split("*")]
    assert all(len(pair) == 2 and all(pair) for pair in pairs), content
    return [(key, value) for key, value in pairs]


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return demo.generate_records(2000, 1)


def test_deterministic_for_a_seed() -> None:
    assert demo.generate_records(50, 7) == demo.generate_records(50, 7)
    assert demo.generate_records(50, 7) != demo.generate_records(50, 8)
    assert demo.generate_records(10, 7) == demo.generate_records(50, 7)[:10]


def test_record_shape(records: list[dict[str, str]]) -> None:
    garments = {garment.name for garment in demo.GARMENTS}
    for record in records:
        assert set(record) == {"content", "summary"}
        pairs = parse_content(record["content"])
        assert pairs[0][0] == "类型" and pairs[0][1] in garments
        keys = [key for key, _ in pairs[1:]]
        assert 3 <= len(keys) <= 7
        assert keys == sorted(keys, key=demo.KEY_ORDER.index)
        assert len(set(keys)) == len(keys)


def test_summary_mentions_every_value_in_order(records: list[dict[str, str]]) -> None:
    for record in records:
        summary = record["summary"]
        position = 0
        for _, value in parse_content(record["content"]):
            found = summary.find(value, position)
            assert found >= 0, (value, record)
            position = found + len(value)


def test_length_stats(records: list[dict[str, str]]) -> None:
    content = [len(r["content"]) for r in records]
    summary = [len(r["summary"]) for r in records]
    assert min(summary) >= 60 and max(summary) <= 180
    assert 95 <= statistics.mean(summary) <= 125
    assert min(content) >= 10 and max(content) <= 126
    assert 30 <= statistics.mean(content) <= 60


def test_brand_placeholder_is_occasional(records: list[dict[str, str]]) -> None:
    rate = sum(demo.BRAND in r["summary"] for r in records) / len(records)
    assert 0.02 <= rate <= 0.09


def test_pretrain_rows_are_summaries_only() -> None:
    rows = demo.generate_pretrain_rows(20, 3)
    assert [r["text"] for r in rows] == [r["summary"] for r in demo.generate_records(20, 3)]
    assert all(set(row) == {"text"} and "#" not in row["text"] for row in rows)


def test_shipped_files_match_generator() -> None:
    expected = {
        "train.jsonl": demo.generate_records(demo.TRAIN_ROWS, demo.TRAIN_SEED),
        "dev.jsonl": demo.generate_records(demo.DEV_ROWS, demo.DEV_SEED),
        "pretrain.jsonl": demo.generate_pretrain_rows(demo.PRETRAIN_ROWS, demo.PRETRAIN_SEED),
    }
    for name, rows in expected.items():
        assert read_jsonl(DATA_DIR / name) == rows, name
    total = sum((DATA_DIR / name).stat().st_size for name in expected)
    assert total < 2_000_000
    assert (DATA_DIR / "README.md").is_file()


def test_main_writes_files(tmp_path: Path) -> None:
    demo.main(["--out", str(tmp_path / "out")])
    for name in ("train.jsonl", "dev.jsonl", "pretrain.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (DATA_DIR / name).read_bytes()


def test_write_jsonl_keeps_chinese_readable(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    demo.write_jsonl(path, [{"content": "类型#裙", "summary": "好看"}])
    assert path.read_text(encoding="utf-8") == '{"content": "类型#裙", "summary": "好看"}\n'


def test_modules_import_without_torch() -> None:
    code = (
        "import sys, runner.data.demo, runner.models.tiny; "
        "assert not {'torch', 'transformers', 'tokenizers'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- the English demo sets of the chat and alpaca starters (runner/data/demo_english.py) ---


def test_english_shipped_files_match_generator(tmp_path: Path) -> None:
    from runner.data import demo_english

    for name, rows in demo_english.shipped_files().items():
        assert read_jsonl(REPO / "data" / name) == rows, name
    demo_english.main(["--out", str(tmp_path)])  # byte for byte, as the module says
    for name in demo_english.shipped_files():
        assert (tmp_path / name).read_bytes() == (REPO / "data" / name).read_bytes(), name
    for folder in ("alpaca-demo", "chat-demo"):
        assert (REPO / "data" / folder / "README.md").is_file()
        assert sum(f.stat().st_size for f in (REPO / "data" / folder).iterdir()) < 500_000


def test_english_sets_are_deterministic_and_seeded() -> None:
    from runner.data import demo_english as de

    assert de.generate_alpaca(30, 5) == de.generate_alpaca(30, 5) != de.generate_alpaca(30, 6)
    assert de.generate_chat(30, 5) == de.generate_chat(30, 5) != de.generate_chat(30, 6)


def test_alpaca_outputs_quote_their_inputs() -> None:
    """The mapping is learnable: every word of an input's values is in the output."""
    from runner.data import demo_english as de

    rows = de.generate_alpaca(de.ALPACA_TRAIN_ROWS, de.ALPACA_TRAIN_SEED)
    assert 0.15 < sum(r["input"] == "" for r in rows) / len(rows) < 0.35  # some without input
    for r in rows:
        assert set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"]
        values = [part.split(": ", 1)[-1] for part in r["input"].split("; ") if part]
        words = [w for v in values for w in v.split() if w not in ("a", "the")]
        assert all(w in r["output"] for w in words), r


def test_chat_conversations_alternate_and_replies_repeat_earlier_words() -> None:
    from runner.data import demo_english as de

    rows = de.generate_chat(de.CHAT_TRAIN_ROWS, de.CHAT_TRAIN_SEED)
    assert 0.2 < sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows) < 0.4
    for r in rows:
        turns = [m for m in r["messages"] if m["role"] != "system"]
        assert 4 <= len(turns) <= 6
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)

        def words(text: str) -> set[str]:
            common = {"a", "an", "the", "is", "it", "you", "your", "in", "at", "on", "of"}
            return {w.strip(".,!?").lower() for w in text.split()} - common

        said = set().union(*(words(m["content"]) for m in turns[:-1]))
        shared = words(turns[-1]["content"]) & said
        assert shared, r  # the last reply (what compare scores) repeats what was said before

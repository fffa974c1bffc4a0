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

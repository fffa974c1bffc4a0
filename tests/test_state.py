"""State files, fingerprints and the run lock (no torch)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.errors import RecipeError
from runner.rundir import CorruptState, new_state, read_record, read_state, run_lock
from runner.state import fingerprint, is_disk_full, path_size, write_json_atomic


def _state() -> dict:
    return new_state("format") | {
        "status": "done",
        "fingerprint": "f",
        "params": {},
        "inputs": {},
        "outputs": [],
        "upstream": {},
        "libraries": {},
        "started": "s",
        "ended": "e",
        "metrics": {},
    }


def test_fingerprint_ignores_key_order() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_atomic_write_sorted_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state" / "x.json"
    write_json_atomic(path, {"b": 1, "a": 2})
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.json"
    write_json_atomic(path, {"v": 1})

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as e:
        write_json_atomic(path, {"v": 2})
    assert is_disk_full(e.value)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("content", ["", "{", '{"stage": "format"}', "[1, 2]"])
def test_corrupt_state_is_named(tmp_path: Path, content: str) -> None:
    path = tmp_path / "format.json"
    path.write_text(content)
    with pytest.raises(CorruptState) as e:
        read_state(path)
    assert str(path) in str(e.value)


def test_state_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "format.json"
    write_json_atomic(path, _state())
    assert read_state(path) == _state()
    assert read_state(tmp_path / "absent.json") is None


def test_output_size_counts_a_folders_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "f.txt").write_text("one")
    (tmp_path / "a" / "b" / "g.txt").write_text("four")
    assert path_size(tmp_path / "a") == 7
    assert path_size(tmp_path / "a" / "f.txt") == 3
    assert path_size(tmp_path / "absent") is None


def test_state_files_with_an_output_sha256_stay_readable(tmp_path: Path) -> None:
    """Earlier versions recorded each output's sha256; it is no longer written, nor needed."""
    path = tmp_path / "format.json"
    old = _state() | {"outputs": [{"path": "data/formatted", "sha256": "ab" * 32, "size": 9}]}
    write_json_atomic(path, old)
    assert read_state(path) == old


def test_read_record_is_none_for_anything_damaged(tmp_path: Path) -> None:
    path = tmp_path / "owner.json"
    assert read_record(path) is None  # absent
    path.write_text('{"name": "a"}', encoding="utf-8")
    assert read_record(path) == {"name": "a"}
    assert read_record(path, list) is None  # an object where a list belongs
    path.write_text("[1, 2]", encoding="utf-8")
    assert read_record(path, list) == [1, 2]
    assert read_record(path) is None
    path.write_text("{half", encoding="utf-8")
    assert read_record(path) is None
    path.write_bytes(b"\xff\xfe")
    assert read_record(path) is None


def test_lock_refuses_a_live_holder(tmp_path: Path) -> None:
    hold = (
        "import sys, time\nfrom pathlib import Path\nfrom runner.rundir import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n"
        "    print('locked', flush=True)\n    time.sleep(30)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(RecipeError) as e, run_lock(tmp_path):
            pass
        assert f"pid {holder.pid}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()


def test_lock_takes_over_a_stale_one(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(str(dead.pid))
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_a_second_builder_of_a_cache_folder_waits_for_the_first(tmp_path: Path) -> None:
    import threading

    from runner.state import cache_build_lock

    out = tmp_path / "models" / "tiny"
    said: list[str] = []
    order: list[str] = []

    def second() -> None:
        with cache_build_lock(out, said.append):
            order.append("second")

    with cache_build_lock(out, said.append):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.5)  # without the lock it would be done by now
        order.append("first")
    waiter.join(10)
    assert order == ["first", "second"]
    assert said == [f"waiting for another process that is building {out}"]

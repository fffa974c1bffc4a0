"""RECIPE_PROFILE (runner/profiling.py) records the asked training steps; bench/profile_summary.py
says where a trace's time went."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.profile_summary import family, summarize  # noqa: E402
from runner import profiling  # noqa: E402


@pytest.mark.parametrize(
    "value, expected",
    [("8:2", (8, 2)), ("8", (8, 1)), ("", None), ("x", None), ("0:2", None), ("3:y", None)],
)
def test_window(monkeypatch: pytest.MonkeyPatch, value: str, expected: object) -> None:
    monkeypatch.setenv(profiling.ENV, value)
    assert profiling.window() == expected


def test_unset_installs_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(profiling.ENV, raising=False)
    assert profiling.trainer_hooks(tmp_path, 0) == []


def test_the_asked_steps_become_a_trace_of_that_rank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.setenv(profiling.ENV, "2:2")
    (hook,) = profiling.trainer_hooks(tmp_path / "logs", 3)
    trace = tmp_path / "logs" / "profile-rank3.json.gz"
    state = SimpleNamespace(global_step=0)
    for step in range(1, 5):
        hook.on_step_begin(None, state, None)
        torch.ones(64, 64) @ torch.ones(64, 64)
        state.global_step = step
        hook.on_step_end(None, state, None)
        assert trace.exists() == (step >= 3), step  # written once step 3 (2 + 2 - 1) ends
    with gzip.open(trace, "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "aten::mm" in names


def test_summary_splits_busy_idle_and_communication(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def x(cat: str, name: str, ts: float, dur: float) -> dict[str, object]:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        x("kernel", "gemm", 0, 4000),
        x("kernel", "ncclDevKernel_AllReduce", 3000, 3000),  # 2 ms of it after the gemm
        x("cuda_runtime", "cudaStreamSynchronize", 6000, 2500),  # the CPU waits: GPU idle
        x("kernel", "gemm", 8000, 2000),
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summarize(path, gaps_shown=3)
    out = capsys.readouterr().out
    assert (
        "recorded 10.0 ms; GPU busy 8.0 ms (80.0%); idle 2.0 ms; NCCL kernels 3.0 ms, "
        "not overlapped by compute 2.0 ms"
    ) in out
    assert "2.0 ms at +    6.0 ms: cudaStreamSynchronize 2.0" in out
    assert "kernel time by family: matmul 6.0 ms, communication 3.0 ms" in out


def test_kernel_families_first_match_wins() -> None:
    assert family("triton_tem_fused_flex_attention_backward_0") == "attention"
    assert family("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "nf4 dequantize"
    assert family("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == (
        "compiled elementwise (triton)"
    )
    assert family("void at::native::vectorized_elementwise_kernel<4, ...>") == "eager elementwise"
    assert family("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNN") == "matmul"
    assert family("void at::native::cunn_SoftMaxForward<4, float, float>") == "loss (softmax, nll)"
    assert family("memcpy32_post") == "other"

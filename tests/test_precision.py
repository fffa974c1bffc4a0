"""runner/precision.py: every recipe value x hardware fact, with the dtype each one must give.

The tables are written out by hand from the schema's promises (bf16 = "auto": on where the GPU
supports bf16, off on CPU; compute "auto": bf16 where the GPU supports it, else fp16 on GPU,
fp32 on CPU; upcast "auto": only when the compute dtype is not bfloat16)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from runner.precision import Hardware, Precision, resolve

CPU = Hardware(cuda=False, bf16=False)
OLD_GPU = Hardware(cuda=True, bf16=False)  # e.g. a T4 or V100
GPU = Hardware(cuda=True, bf16=True)
MACHINES = {"cpu": CPU, "old-gpu": OLD_GPU, "gpu": GPU}

# bnb_4bit_compute_dtype x machine -> resolved compute dtype
COMPUTE = {
    ("auto", "cpu"): "float32",
    ("auto", "old-gpu"): "float16",
    ("auto", "gpu"): "bfloat16",
    ("float32", "cpu"): "float32",
    ("float32", "old-gpu"): "float32",
    ("float32", "gpu"): "float32",
    ("bfloat16", "cpu"): "bfloat16",
    ("bfloat16", "old-gpu"): "bfloat16",  # refused later by models/load.precision_problems
    ("bfloat16", "gpu"): "bfloat16",
    ("float16", "cpu"): "float16",
    ("float16", "old-gpu"): "float16",
    ("float16", "gpu"): "float16",
}

# (train.bf16, train.fp16) x machine -> the trainer's mixed precision
AUTOCAST: dict[tuple[bool | str, bool, str], str | None] = {
    ("auto", False, "cpu"): None,
    ("auto", False, "old-gpu"): None,
    ("auto", False, "gpu"): "bf16",
    ("auto", True, "cpu"): "fp16",  # refused later: fp16 needs CUDA
    ("auto", True, "old-gpu"): "fp16",
    ("auto", True, "gpu"): "fp16",  # the explicit fp16 wins over auto, never both flags
    (True, False, "cpu"): "bf16",
    (True, False, "old-gpu"): "bf16",  # refused later: this GPU has no bf16
    (True, False, "gpu"): "bf16",
    (True, True, "cpu"): "bf16",  # the recipe loader refuses bf16 = fp16 = true before this
    (True, True, "old-gpu"): "bf16",
    (True, True, "gpu"): "bf16",
    (False, False, "cpu"): None,
    (False, False, "old-gpu"): None,
    (False, False, "gpu"): None,
    (False, True, "cpu"): "fp16",
    (False, True, "old-gpu"): "fp16",
    (False, True, "gpu"): "fp16",
}

# upcast_to_fp32 x resolved compute dtype -> peft's fp32 upcast
UPCAST: dict[tuple[bool | str, str], bool] = {
    ("auto", "float32"): True,
    ("auto", "float16"): True,
    ("auto", "bfloat16"): False,
    (True, "float32"): True,
    (True, "float16"): True,
    (True, "bfloat16"): True,
    (False, "float32"): False,
    (False, "float16"): False,
    (False, "bfloat16"): False,
}

ALL = list(
    itertools.product(
        ("auto", "float32", "bfloat16", "float16"),
        ("auto", True, False),
        (False, True),
        ("auto", True, False),
        MACHINES,
    )
)


@pytest.mark.parametrize(("compute", "bf16", "fp16", "upcast", "machine"), ALL)
def test_every_combination(
    compute: str, bf16: bool | str, fp16: bool, upcast: bool | str, machine: str
) -> None:
    got = resolve(compute, bf16, fp16, upcast, MACHINES[machine])
    dtype = COMPUTE[(compute, machine)]
    autocast = AUTOCAST[(bf16, fp16, machine)]
    assert got == Precision(
        device="cpu" if machine == "cpu" else "cuda",
        compute=dtype,
        autocast=autocast,
        upcast=UPCAST[(upcast, dtype)],
    )
    assert (got.bf16, got.fp16) == (autocast == "bf16", autocast == "fp16")


def test_the_usual_recipes() -> None:
    """The starters' settings, spelled out: what a user reads in `recipe plan --model`."""
    gpu = resolve("bfloat16", "auto", False, "auto", GPU)
    assert gpu == Precision("cuda", "bfloat16", "bf16", False)
    assert (gpu.bf16, gpu.fp16) == (True, False)
    t4 = resolve("auto", "auto", False, "auto", OLD_GPU)
    assert t4 == Precision("cuda", "float16", None, True)
    cpu = resolve("float32", "auto", False, "auto", CPU)
    assert cpu == Precision("cpu", "float32", None, True)
    assert (cpu.bf16, cpu.fp16) == (False, False)


def test_no_torch_at_import() -> None:
    code = "import sys, runner.precision; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

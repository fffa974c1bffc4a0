"""The launch plan without launching: accelerate's command line, failure messages, the plan's
reasons when the number of processes changes, and `--gpus`. No torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.launch import accelerate_command, is_launched, worker_failure
from runner.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "adgen-tiny.toml"
SPEC = Path("/run/logs/launch/spec.json")


def flags(cmd: list[str]) -> dict[str, str]:
    """--name value pairs of a command line (valueless flags map to '')."""
    out: dict[str, str] = {}
    for i, part in enumerate(cmd):
        if part.startswith("--"):
            nxt = cmd[i + 1] if i + 1 < len(cmd) else ""
            out[part] = "" if nxt.startswith("--") or nxt == "-m" else nxt
    return out


def test_one_process_trains_in_place_and_gpus_launches() -> None:
    assert not is_launched(load_recipe(TINY))
    assert is_launched(load_recipe(TINY, ["launch.num_processes=2"]))


def test_ddp_command_runs_the_worker_module_through_accelerate() -> None:
    recipe = load_recipe(TINY, ["launch.num_processes=4"])
    cmd = accelerate_command(recipe, SPEC, cuda=True)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[-3:] == ["-m", "runner.worker", str(SPEC)]
    f = flags(cmd)
    assert f["--num_processes"] == "4" and f["--num_machines"] == "1"
    assert "--multi_gpu" in f and "--use_fsdp" not in f
    assert int(f["--main_process_port"]) > 0  # a free port, so two runs on one host can coexist
    assert f["--mixed_precision"] == "no"  # bf16 / fp16 come from [train] via TrainingArguments
    assert "--num_cpu_threads_per_process" not in f


@pytest.mark.parametrize(("cores", "processes", "threads"), [(8, 2, "4"), (7, 2, "3"), (2, 4, "1")])
def test_cpu_processes_share_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int, threads: str
) -> None:
    """Each process gets its share of the cores, at least one, never the whole machine."""
    monkeypatch.setattr("runner.launch.os.cpu_count", lambda: cores)
    recipe = load_recipe(TINY, [f"launch.num_processes={processes}"])
    f = flags(accelerate_command(recipe, SPEC, cuda=False))
    assert f["--num_cpu_threads_per_process"] == threads


def test_fsdp_command_is_fsdp_qlora() -> None:
    recipe = load_recipe(
        TINY,
        [
            "launch.num_processes=2",
            "launch.strategy=fsdp",
            "quantization.bnb_4bit_compute_dtype=bfloat16",
            "quantization.bnb_4bit_quant_storage=bfloat16",
            "train.optim=adamw_torch",
        ],
    )
    f = flags(accelerate_command(recipe, SPEC, cuda=True))
    assert "--use_fsdp" in f and "--multi_gpu" not in f
    assert f["--fsdp_use_orig_params"] == "false"  # peft's wrap policy separates the adapters
    assert f["--fsdp_sharding_strategy"] == "FULL_SHARD"
    assert f["--fsdp_sync_module_states"] == "true"


def test_multi_node_passes_rank_and_address(tmp_path: Path) -> None:
    recipe = load_recipe(
        TINY,
        [
            "launch.num_processes=8",
            "launch.num_machines=2",
            "launch.machine_rank=1",
            "launch.main_process_ip=10.0.0.1",
        ],
    )
    f = flags(accelerate_command(recipe, SPEC, cuda=True))
    assert f["--num_processes"] == "16"  # accelerate counts processes over all machines
    assert (f["--num_machines"], f["--machine_rank"]) == ("2", "1")
    assert (f["--main_process_ip"], f["--main_process_port"]) == ("10.0.0.1", "29500")


def test_config_file_leaves_unwritten_keys_to_it(tmp_path: Path) -> None:
    config = tmp_path / "accelerate.yaml"
    config.write_text("num_processes: 2\n", encoding="utf-8")
    recipe = load_recipe(TINY, [f"launch.config_file={config}"], allow=[tmp_path])  # outside
    cmd = accelerate_command(recipe, SPEC, cuda=True)
    f = flags(cmd)
    assert f["--config_file"] == str(config)
    assert not {"--num_processes", "--multi_gpu", "--mixed_precision"} & set(f)
    assert is_launched(recipe)


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    import pytest

    from runner.errors import RecipeError

    recipe = load_recipe(TINY, ["launch.config_file=nowhere.yaml"])
    with pytest.raises(RecipeError) as e:
        accelerate_command(recipe, SPEC, cuda=True)
    assert e.value.lines == [
        f"{TINY}: $.launch.config_file: "
        f"{ROOT / 'recipes' / 'nowhere.yaml'} does not exist; run `accelerate config "
        f"--config_file nowhere.yaml` or remove the key"
    ]


TORCHRUN_REPORT = """
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 16833)  (SIGTERM)
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 16834)  (SIGKILL)
  error_file: <N/A>
"""


def test_a_killed_rank_is_named_not_the_peer_that_lost_it(tmp_path: Path) -> None:
    log = tmp_path / "launch.log"
    log.write_text(TORCHRUN_REPORT, encoding="utf-8")
    (tmp_path / "rank-0.error.json").write_text(
        json.dumps({"rank": 0, "error": "RuntimeError: Connection reset by peer"}), encoding="utf-8"
    )
    result = {"error": "RuntimeError: Connection reset by peer"}
    why = worker_failure(tmp_path, log, 1, result)
    assert why == "training process rank 1 was killed by SIGKILL"


def test_the_failing_rank_says_why(tmp_path: Path) -> None:
    log = tmp_path / "launch.log"
    log.write_text(TORCHRUN_REPORT.replace("-9 (pid", "1 (pid"), encoding="utf-8")
    (tmp_path / "rank-1.error.json").write_text(
        json.dumps({"rank": 1, "error": "OutOfMemoryError: CUDA out of memory"}), encoding="utf-8"
    )
    assert worker_failure(tmp_path, log, 1, None) == "rank 1: OutOfMemoryError: CUDA out of memory"


def test_without_a_report_rank_zero_or_the_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "launch.log"
    log.write_text("", encoding="utf-8")
    assert worker_failure(tmp_path, log, 3, {"error": "boom"}) == "boom"
    assert worker_failure(tmp_path, log, 3, None) == "the training processes exited with code 3"


def test_gpus_changes_the_train_fingerprint_and_says_so(tmp_path: Path) -> None:
    from datakit import mark_done

    from runner.plan import compute_plan

    one = load_recipe(TINY, [f"recipe.output_dir={tmp_path}"])
    two = load_recipe(TINY, [f"recipe.output_dir={tmp_path}", "launch.num_processes=2"])
    before = {st.name: st for st in compute_plan(one)}
    after = {st.name: st for st in compute_plan(two)}
    assert before["tokenize"].fingerprint == after["tokenize"].fingerprint
    assert before["quantize-load"].fingerprint == after["quantize-load"].fingerprint
    assert before["train"].fingerprint != after["train"].fingerprint
    mark_done(TINY, (f"recipe.output_dir={tmp_path}",))
    shown = CliRunner().invoke(
        cli, ["plan", str(TINY), "--set", f"recipe.output_dir={tmp_path}", "--gpus", "2"]
    )
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if x.split()[0] == "train")
    assert "stale" in line and "changed params: launch.num_processes 1 -> 2" in line


def test_gpus_must_be_positive() -> None:
    shown = CliRunner().invoke(cli, ["run", str(TINY), "--gpus", "0"])
    assert shown.exit_code == 2
    assert "Invalid value for '--gpus': 0 is not in the range x>=1." in shown.output


def test_one_process_on_a_multi_gpu_machine_uses_one_gpu() -> None:
    """The Trainer would otherwise use nn.DataParallel semantics: batch x GPU count (measured:
    a batch of 32 trained 128 per step on a 4-GPU machine)."""
    from types import SimpleNamespace

    from runner.training.trainer import one_gpu_per_process

    single = one_gpu_per_process(SimpleNamespace(n_gpu=4, world_size=1, _n_gpu=4))
    assert single._n_gpu == 1
    launched = one_gpu_per_process(SimpleNamespace(n_gpu=1, world_size=4, _n_gpu=1))
    assert launched._n_gpu == 1
    cpu = one_gpu_per_process(SimpleNamespace(n_gpu=0, world_size=1, _n_gpu=0))
    assert cpu._n_gpu == 0


def test_status_reads_train_metrics_as_lines() -> None:
    from runner.report.data_metrics import metric_lines

    lines = metric_lines(
        "train",
        {
            "global_step": 6,
            "first_logged_loss": 0.53021,
            "last_logged_loss": 0.39736,
            "resumed_from": "checkpoint-2",
            "processes": 2,
            "real_tokens_per_second": 12230.1,
            "real_tokens_per_second_per_process": [6096.8, 6133.3],
            "seconds_per_step": 0.8295,
            "steady_steps": 11,
            "peak_allocated_gib": 9.324,
            "peak_reserved_gib": 10.961,
        },
        {},
    )
    assert lines == [
        "steps: 6, loss 0.5302 -> 0.3974 (resumed from checkpoint-2)",
        "throughput: 12,230 real tokens/s (6,097, 6,133 per process), 0.830 s/step over 11 "
        "steady steps, 2 processes",
        "memory (largest process): peak allocated 9.32 GiB, peak reserved 10.96 GiB",
    ]

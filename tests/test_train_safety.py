"""Train-stage safety without training: checkpoint validation, attempt records and what changed,
on_changed_settings = "refuse", the run lock between real processes, run-dir ownership, output
paths, the progress lines, and the recipe rules for evaluation and early stopping.
The fault-injection suite that really trains is tests/test_faults.py (slow)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.checkpoints import attempt_dir, checkpoint_problem, newest_valid
from runner.cli import cli
from runner.context import Context
from runner.errors import RecipeError
from runner.plan import STAGES, compute_plan
from runner.progress import TrainProgress
from runner.recipe import load_recipe
from runner.rundir import OWNER_FILE, run_lock
from runner.state import write_json_atomic
from runner.training.attempts import changed_settings, refuse_abandoning, write_attempt

ROOT = Path(__file__).resolve().parents[1]


def fake_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint with the framing of the real files: zip archives, a safetensors file."""
    from safetensors.numpy import save_file

    np = pytest.importorskip("numpy")
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"):
        with zipfile.ZipFile(path / name, "w") as z:
            z.writestr("archive/data.pkl", b"x" * 64)
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(path / "adapter_model.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return path


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_complete_checkpoint_is_valid(tmp_path: Path) -> None:
    assert checkpoint_problem(fake_checkpoint(tmp_path, 4)) is None


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json missing or empty"),
        (
            lambda p: (p / "trainer_state.json").write_text('{"global'),
            "trainer_state.json unreadable",
        ),
        (lambda p: (p / "trainer_state.json").write_text("{}"), "trainer_state.json incomplete"),
        (lambda p: (p / "optimizer.pt").write_bytes(b""), "optimizer.pt missing or empty"),
        (lambda p: cut(p / "optimizer.pt"), "optimizer.pt truncated or not a torch archive"),
        (lambda p: cut(p / "scheduler.pt"), "scheduler.pt truncated or not a torch archive"),
        (
            lambda p: cut(p / "adapter_model.safetensors"),
            "adapter_model.safetensors truncated or not safetensors",
        ),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "no weights"),
        (lambda p: cut(p / "rng_state.pth"), "rng_state.pth truncated or not a torch archive"),
        (
            lambda p: (p / "rng_state.pth").write_bytes(b"\0" * 40),
            "rng_state.pth truncated or not a torch archive",
        ),
        (lambda p: cut(p / "scaler.pt"), "scaler.pt truncated or not a torch archive"),
        (
            lambda p: (p / "adapter_config.json").write_text('{"r": 8,'),
            "adapter_config.json unreadable",
        ),
    ],
)
def test_damaged_checkpoint_is_named(tmp_path: Path, damage, problem: str) -> None:  # type: ignore[no-untyped-def]
    path = fake_checkpoint(tmp_path, 8)
    damage(path)
    assert checkpoint_problem(path) == problem


def test_half_written_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 8)
    cut(newest / "adapter_model.safetensors")
    found, skipped = newest_valid(tmp_path)
    assert found == tmp_path / "checkpoint-4"
    assert skipped == [
        "checkpoint 8 skipped: adapter_model.safetensors truncated or not safetensors"
    ]


def fake_sharded_checkpoint(folder: Path, step: int, ranks: int = 1) -> Path:
    """An FSDP checkpoint as accelerate writes it: the adapter and the optimizer state as dist_cp
    folders, no optimizer.pt or adapter file; one rng state per rank when there are several."""
    path = fake_checkpoint(folder, step)
    (path / "optimizer.pt").unlink()
    (path / "adapter_model.safetensors").unlink()
    if ranks > 1:
        for rank in range(ranks):
            shutil.copy(path / "rng_state.pth", path / f"rng_state_{rank}.pth")
        (path / "rng_state.pth").unlink()
    for shards in ("pytorch_model_fsdp_0", "optimizer_0"):
        (path / shards).mkdir()
        for rank in range(ranks):
            (path / shards / f"__{rank}_0.distcp").write_bytes(b"x" * 64)
        (path / shards / ".metadata").write_bytes(b"x" * 64)
    return path


def test_complete_fsdp_sharded_checkpoint_is_resumed(tmp_path: Path) -> None:
    """The train stage restores its LoRA weights and optimizer state itself (measured on an H200:
    the resumed run's losses and adapter equal an uninterrupted run's), so it counts."""
    from runner.launch import what_next

    assert what_next(tmp_path) == "`recipe run` starts it again (no checkpoint was saved)"
    path = fake_sharded_checkpoint(tmp_path, 2)
    assert checkpoint_problem(path) is None
    assert newest_valid(tmp_path) == (path, [])
    assert what_next(tmp_path) == "`recipe run` resumes from checkpoint 2"
    assert checkpoint_problem(fake_sharded_checkpoint(tmp_path, 4, ranks=2)) is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda p: (p / "pytorch_model_fsdp_0" / ".metadata").unlink(),
            "pytorch_model_fsdp_0/.metadata missing or empty",
        ),
        (
            lambda p: (p / "optimizer_0" / ".metadata").write_bytes(b""),
            "optimizer_0/.metadata missing or empty",
        ),
        (lambda p: shutil.rmtree(p / "optimizer_0"), "optimizer_0/.metadata missing or empty"),
        (lambda p: (p / "scheduler.pt").unlink(), "scheduler.pt missing or empty"),
        (lambda p: cut(p / "scheduler.pt"), "scheduler.pt truncated or not a torch archive"),
        (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json missing or empty"),
        (lambda p: (p / "trainer_state.json").write_text("{"), "trainer_state.json unreadable"),
        (lambda p: (p / "trainer_state.json").write_text("[]"), "trainer_state.json incomplete"),
        (lambda p: (p / "rng_state.pth").unlink(), "rng_state.pth missing"),
        (
            lambda p: (p / "rng_state.pth").rename(p / "rng_state.pth.tmp"),
            "rng_state.pth missing",
        ),
        (lambda p: cut(p / "rng_state.pth"), "rng_state.pth truncated or not a torch archive"),
    ],
)
def test_incomplete_fsdp_checkpoint_falls_back_to_the_previous(
    tmp_path: Path,
    damage,  # type: ignore[no-untyped-def]
    problem: str,
) -> None:
    """dist_cp writes .metadata after every rank's shard: a run killed while saving leaves a
    folder without it, and the Trainer writes scheduler, rng and trainer state beside it."""
    previous = fake_sharded_checkpoint(tmp_path, 2)
    newest = fake_sharded_checkpoint(tmp_path, 4)
    damage(newest)
    assert checkpoint_problem(newest) == problem
    assert newest_valid(tmp_path) == (previous, [f"checkpoint 4 skipped: {problem}"])


def test_fsdp_rng_state_of_one_rank_is_checked_too(tmp_path: Path) -> None:
    path = fake_sharded_checkpoint(tmp_path, 2, ranks=2)
    cut(path / "rng_state_1.pth")
    assert checkpoint_problem(path) == "rng_state_1.pth truncated or not a torch archive"


def _record(st, finished: bool = False) -> dict:  # type: ignore[no-untyped-def]
    return {
        **st.identity(),
        "finished": finished,
        "started": "2026-01-01T00:00:00+00:00",
    }


def _train_status(recipe_file: Path, *overrides: str):  # type: ignore[no-untyped-def]
    recipe = load_recipe(recipe_file, overrides)
    return recipe, next(s for s in compute_plan(recipe) if s.name == "train")


def _unfinished_attempt(recipe_file: Path) -> Path:
    """An attempt with learning_rate 2e-4 (the default) stopped at checkpoint 8."""
    recipe, st = _train_status(recipe_file)
    folder = attempt_dir(recipe.run_dir, st.fingerprint)
    fake_checkpoint(folder, 8)
    write_attempt(folder, _record(st))
    write_json_atomic(recipe.run_dir / OWNER_FILE, {"name": recipe.name})  # as a run leaves it
    return folder


def test_changed_settings_names_what_changed(small_recipe: Path) -> None:
    old = _unfinished_attempt(small_recipe)
    recipe, st = _train_status(small_recipe, "train.learning_rate=1e-3", "train.logging_steps=1")
    folder, record, why = changed_settings(recipe.run_dir, st)  # type: ignore[misc]
    assert folder == old and not record["finished"]
    assert why == ["changed params: train.learning_rate 0.0002 -> 0.001"]


def test_same_settings_resume_and_cadence_changes_nothing(small_recipe: Path) -> None:
    old = _unfinished_attempt(small_recipe)
    recipe, st = _train_status(
        small_recipe,
        "train.logging_steps=1",
        "train.save_steps=7",
        "train.on_changed_settings=refuse",
    )
    assert attempt_dir(recipe.run_dir, st.fingerprint) == old
    assert changed_settings(recipe.run_dir, st) is None
    refuse_abandoning(recipe, st)  # resumes: nothing to refuse


def test_refuse_stops_before_abandoning_an_unfinished_attempt(small_recipe: Path) -> None:
    old = _unfinished_attempt(small_recipe)
    recipe, st = _train_status(
        small_recipe, "train.learning_rate=1e-3", "train.on_changed_settings=refuse"
    )
    with pytest.raises(RecipeError) as e:
        refuse_abandoning(recipe, st)
    assert str(e.value) == (
        f"{recipe.run_dir}: train: attempt {old.name} (stopped at checkpoint 8) would be "
        "abandoned: changed params: train.learning_rate 0.0002 -> 0.001; "
        'train.on_changed_settings is "refuse": undo the change to resume it, or pass '
        "--set train.on_changed_settings=restart to start a new attempt"
    )
    recipe, st = _train_status(small_recipe, "train.learning_rate=1e-3")
    refuse_abandoning(recipe, st)  # restart (the default) lets it through


def test_refuse_lets_a_finished_attempt_go(small_recipe: Path) -> None:
    recipe, st = _train_status(small_recipe)
    folder = attempt_dir(recipe.run_dir, st.fingerprint)
    fake_checkpoint(folder, 8)
    write_attempt(folder, _record(st, finished=True))
    recipe, st = _train_status(
        small_recipe, "train.learning_rate=1e-3", "train.on_changed_settings=refuse"
    )
    refuse_abandoning(recipe, st)


def test_refuse_through_the_cli_exits_2_before_any_stage(small_recipe: Path) -> None:
    _unfinished_attempt(small_recipe)
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(small_recipe),
            "--set",
            "train.learning_rate=1e-3",
            "--set",
            "train.on_changed_settings=refuse",
        ],
    )
    assert result.exit_code == 2, result.output
    assert (
        "would be abandoned: changed params: train.learning_rate 0.0002 -> 0.001" in result.output
    )
    assert not (load_recipe(small_recipe).run_dir / "state" / "format.json").exists()


def test_plan_names_the_checkpoint_on_disk(small_recipe: Path) -> None:
    """The state may lag the checkpoints (killed between the save and the state write)."""
    from runner.plan import state_path
    from runner.rundir import new_state
    from runner.state import write_json_atomic

    recipe, st = _train_status(small_recipe)
    fake_checkpoint(attempt_dir(recipe.run_dir, st.fingerprint), 4)
    fake_checkpoint(attempt_dir(recipe.run_dir, st.fingerprint), 8)
    write_json_atomic(
        state_path(recipe.run_dir, "train"),
        new_state("train")
        | {
            "status": "running",
            **st.identity(),
            "started": "t",
            "ended": None,
            "metrics": {"last_checkpoint_step": 4},
            "outputs": [],
        },
    )
    _, st = _train_status(small_recipe)
    assert st.status == "pending"
    assert st.reasons == ["last run did not finish; resumes from checkpoint 8"]


def test_cut_rng_state_plan_and_run_agree_on_the_previous_checkpoint(small_recipe: Path) -> None:
    """A truncated rng_state.pth made every resume fail with OSError while the plan promised
    to resume from it: now the checkpoint is invalid for both, and the previous one is used."""
    from runner.plan import state_path
    from runner.rundir import new_state
    from runner.state import write_json_atomic
    from runner.training.attempts import start_attempt

    recipe, st = _train_status(small_recipe)
    folder = attempt_dir(recipe.run_dir, st.fingerprint)
    fake_checkpoint(folder, 4)
    cut(fake_checkpoint(folder, 8) / "rng_state.pth")
    (fake_checkpoint(folder, 12) / "rng_state_1.pth").write_bytes(b"PK\x03\x04cut")
    write_json_atomic(
        state_path(recipe.run_dir, "train"),
        new_state("train")
        | {
            "status": "interrupted",
            **st.identity(),
            "started": "t",
            "ended": None,
            "metrics": {"last_checkpoint_step": 12},
            "outputs": [],
        },
    )
    _, st = _train_status(small_recipe)
    assert st.reasons == ["last run interrupted; resumes from checkpoint 4"]

    lines: list[str] = []
    ctx = Context(recipe=recipe, run_dir=recipe.run_dir, echo=lines.append, status=st)
    assert start_attempt(ctx, folder) == folder / "checkpoint-4"
    assert lines == [
        "train: checkpoint 12 skipped: rng_state_1.pth truncated or not a torch archive",
        "train: checkpoint 8 skipped: rng_state.pth truncated or not a torch archive",
        f"train: resumed from checkpoint 4 ({folder / 'checkpoint-4'})",
    ]
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-4"]


# ------------------------------------------------------------------------------ the run lock

HOLD = (
    "import sys, time\nfrom pathlib import Path\nfrom runner.rundir import run_lock\n"
    "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n"
)


def test_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        second = subprocess.run(
            [sys.executable, "-c", HOLD, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1 and "locked" not in second.stdout
        assert (
            f"{tmp_path}: another `recipe run` (pid {holder.pid}) is using this run directory; "
            f"wait for it to finish; `kill -INT {holder.pid}` stops it after saving a "
            "checkpoint"
        ) in second.stderr
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # the kernel released the dead holder's lock
        assert (tmp_path / ".lock").read_text() == str(__import__("os").getpid())
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------ outputs, ownership


def test_stage_outputs_are_fixed_paths_inside_the_run_dir(tmp_path: Path) -> None:
    for stage in STAGES:
        for rel in stage.outputs:
            assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
    ctx = Context(recipe=None, run_dir=tmp_path, echo=print)
    assert ctx.path("train/final") == tmp_path / "train" / "final"
    for bad in ("../elsewhere", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="stage outputs stay inside the run directory"):
            ctx.path(bad)


def test_another_recipes_run_dir_needs_force(small_recipe: Path) -> None:
    from runner.run import check_ownership

    recipe = load_recipe(small_recipe)
    check_ownership(recipe, force=False)
    other = load_recipe(small_recipe, ("recipe.name=other",))
    result = CliRunner().invoke(
        cli, ["run", str(small_recipe), "--set", "recipe.name=other", "--until", "format"]
    )
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"{recipe.run_dir}: holds the runs of recipe 'small', not 'other'; set recipe.output_dir "
        "to another folder, or pass --force to reuse it"
    )
    assert not (recipe.run_dir / "state" / "format.json").exists()
    check_ownership(other, force=True)
    owner = json.loads((recipe.run_dir / "state" / "owner.json").read_text())
    assert owner["name"] == "other"


# ------------------------------------------------------------------------------- the recipe


def test_early_stopping_needs_evaluation(small_recipe: Path) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(small_recipe, ("train.early_stopping_patience=2",))
    assert e.value.lines == [
        "--set train.early_stopping_patience=2: $.train.early_stopping_patience: early stopping "
        "watches the held-out loss: set train.eval_steps > 0 (e.g. the same as save_steps), or "
        "early_stopping_patience = 0"
    ]
    recipe = load_recipe(small_recipe, ("train.eval_steps=5", "train.early_stopping_patience=2"))
    assert recipe.get("train.early_stopping_threshold") == 0.0


def test_evaluation_needs_held_out_rows(small_recipe: Path) -> None:
    text = small_recipe.read_text().replace('heldout_split = "dev"\n', "heldout_rows = 0\n")
    small_recipe.write_text(text + "\n[compare]\nnum_examples = 0\n")
    load_recipe(small_recipe)
    with pytest.raises(RecipeError) as e:
        load_recipe(small_recipe, ("train.eval_steps=5",))
    assert e.value.lines == [
        "--set train.eval_steps=5: $.train.eval_steps: evaluation needs held-out rows: set "
        "dataset.heldout_rows > 0 or dataset.heldout_split, or train.eval_steps = 0"
    ]


def test_on_changed_settings_and_eval_do_not_all_restart(small_recipe: Path) -> None:
    _, base = _train_status(small_recipe)
    _, same = _train_status(small_recipe, "train.on_changed_settings=refuse")
    _, evaluated = _train_status(small_recipe, "train.eval_steps=5")
    assert same.fingerprint == base.fingerprint
    assert evaluated.fingerprint != base.fingerprint  # eval loss is part of train's output


# ----------------------------------------------------------------------------- progress


def test_progress_lines_carry_loss_speed_and_eta() -> None:
    lines: list[str] = []
    now = [100.0]
    progress = TrainProgress(lines.append, bar=False, clock=lambda: now[0])
    progress.start(total=12, step=4, tokens=1000)  # resumed at step 4
    now[0] = 102.0
    progress.step(5, 1500)
    progress.logged(5, {"loss": 2.5, "learning_rate": 1e-3, "epoch": 0.1})
    progress.logged(5, {"eval_loss": 2.25})
    progress.stop()
    assert lines == [
        "train: step 5/12 loss 2.5000 lr 1.00e-03, 250 tok/s, ETA 0:00:14",
        "train: step 5/12 eval loss 2.2500",
    ]


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.setenv("TERM", "xterm-256color")  # rich draws no bar under TERM=dumb (CI)

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    now = [0.0]
    progress = TrainProgress(lambda line: None, bar=True, console=console, clock=lambda: now[0])
    progress.start(total=10, step=0, tokens=0)
    now[0] = 4.0
    progress.logged(4, {"loss": 1.25, "learning_rate": 1e-3})
    progress.step(4, 2000)
    progress.stop()
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "4/10" in shown and "loss 1.2500" in shown and "500 tok/s" in shown
    assert "ETA 0:00:06" in shown


def test_lines_go_above_the_bar_while_it_is_drawn() -> None:
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    echoed: list[str] = []
    progress = TrainProgress(lambda line: None, bar=True, console=console)
    out = progress.printer(echoed.append)
    out("before")
    progress.start(total=10, step=0, tokens=0)
    out("train: step 1/10 [not markup]")
    progress.stop()
    out("after")
    assert echoed == ["before", "after"]
    assert "train: step 1/10 [not markup]\n" in console.file.getvalue()  # type: ignore[attr-defined]


def test_interrupt_flag_first_signal_asks_second_stops() -> None:
    import os
    import signal

    from runner.training.loop import interrupt_flag

    flag, restore = interrupt_flag()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert flag["stop"] is True
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        restore()

"""The plan: stages as data, done / stale (why) / pending, decided without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datakit
import pytest
from datakit import mark_done

from runner.plan import STAGE_NAMES, compute_plan, state_path
from runner.recipe import load_recipe


def statuses(
    recipe_file: Path, overrides: tuple[str, ...] = ()
) -> dict[str, tuple[str, list[str]]]:
    plan = compute_plan(load_recipe(recipe_file, overrides))
    return {st.name: (st.status, st.reasons) for st in plan}


def test_six_stages_in_order_each_after_the_stages_it_reads(small_recipe: Path) -> None:
    plan = compute_plan(load_recipe(small_recipe))
    names = [st.name for st in plan]
    assert names == ["format", "tokenize", "quantize-load", "train", "save", "compare"]
    assert list(STAGE_NAMES) == names  # what --until and save's state copy walk
    for i, st in enumerate(plan):  # a stage never runs before one whose output it reads
        assert all(names.index(u) < i for u in st.upstream), (st.name, st.upstream)
    assert {u for st in plan for u in st.upstream} == set(names[:-1])  # each feeds another


def test_fresh_run_dir_is_all_pending(small_recipe: Path) -> None:
    assert {s for s, _ in statuses(small_recipe).values()} == {"pending"}


def test_all_done_after_marking(small_recipe: Path) -> None:
    mark_done(small_recipe)
    assert {s for s, _ in statuses(small_recipe).values()} == {"done"}


def test_lora_rank_change_reruns_from_quantize_load(small_recipe: Path) -> None:
    mark_done(small_recipe)
    st = statuses(small_recipe, ("lora.r=16",))
    assert st["format"][0] == "done" and st["tokenize"][0] == "done"
    assert st["quantize-load"] == ("stale", ["changed params: lora.r 8 -> 16"])
    assert st["train"] == ("stale", ["upstream changed: quantize-load"])
    assert st["save"][0] == "stale" and st["compare"][0] == "stale"


def test_template_change_reruns_format_and_tokenize_not_the_model(small_recipe: Path) -> None:
    mark_done(small_recipe)
    st = statuses(small_recipe, ("template.prompt=Question: {{ q }}",))
    assert st["format"][0] == "stale"
    assert st["format"][1][0].startswith("changed params: template.prompt")
    assert st["tokenize"] == ("stale", ["upstream changed: format"])
    assert st["quantize-load"][0] == "done"
    assert st["train"][0] == "stale"


def test_logging_interval_changes_nothing(small_recipe: Path) -> None:
    mark_done(small_recipe)
    assert {s for s, _ in statuses(small_recipe, ("train.logging_steps=1",)).values()} == {"done"}


def test_changed_data_file_is_named(small_recipe: Path) -> None:
    mark_done(small_recipe)
    with open(small_recipe.parent / "data" / "train.jsonl", "a") as f:
        f.write('{"q": "new", "a": "row"}\n')
    status, reasons = statuses(small_recipe)["format"]
    assert status == "stale"
    assert reasons == ["changed inputs: dataset.files.data/train.jsonl"]


def test_a_new_scorer_version_reruns_compare_alone(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark_done(small_recipe)
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "99.0" if name == "sacrebleu" else real(name)
    )
    st = statuses(small_recipe)
    assert {n: s for n, (s, _) in st.items() if s != "done"} == {"compare": "stale"}
    assert st["compare"][1] == [
        f"library versions changed: sacrebleu '{real('sacrebleu')}' -> '99.0'"
    ]


def test_missing_output_makes_stage_stale(small_recipe: Path) -> None:
    mark_done(small_recipe)
    recipe = load_recipe(small_recipe)
    (recipe.run_dir / "compare.md").unlink()
    assert statuses(small_recipe)["compare"] == ("stale", ["output missing: compare.md"])


def test_corrupt_state_is_pending_with_reason(small_recipe: Path) -> None:
    mark_done(small_recipe)
    recipe = load_recipe(small_recipe)
    state_path(recipe.run_dir, "train").write_text('{"truncated')
    status, reasons = statuses(small_recipe)["train"]
    assert status == "pending"
    assert reasons[0].startswith("corrupt state: ") and "train.json" in reasons[0]


def test_plan_validate_help_do_not_import_torch(small_recipe: Path) -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from runner.cli import cli\n"
        "for args in (['--help'], ['validate', sys.argv[1]], ['plan', sys.argv[1]],"
        " ['status', sys.argv[1]]):\n"
        "    r = CliRunner().invoke(cli, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code, str(small_recipe)], check=True)


def test_stages_choose_expandable_segments_before_torch() -> None:
    """Importing a stage sets the CUDA allocator to expandable segments (packed rows of varying
    length fragment it) before torch is imported, and leaves a setting of the user's alone."""
    code = (
        "import os, sys\n"
        "import runner.stages\n"
        "assert 'torch' not in sys.modules\n"
        "print(os.environ.get(runner.stages.allocator_variable()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("ALLOC_CONF")}

    def chosen(**extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    from runner.stages import allocator_variable

    assert allocator_variable() == "PYTORCH_ALLOC_CONF"  # torch >= 2.9 (the old name warns)
    assert chosen() == "expandable_segments:True"
    assert chosen(PYTORCH_ALLOC_CONF="max_split_size_mb:128") == "max_split_size_mb:128"
    assert chosen(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:False") == "None"


def test_compare_metrics_rerun_compare_alone(small_recipe: Path) -> None:
    mark_done(small_recipe)
    st = statuses(small_recipe, ('compare.metrics=["chrf", "exact_match"]',))
    assert {n: s for n, (s, _) in st.items() if s != "done"} == {"compare": "stale"}
    (reason,) = st["compare"][1]
    assert reason.startswith("changed params: compare.metrics ['bleu-4', ")
    assert reason.endswith(" -> ['chrf', 'exact_match']")


def test_a_run_from_before_compare_metrics_reruns_compare_once(
    small_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """State files written before the key existed: only compare re-runs (its scores of
    space-separated text changed anyway), the model and the data stay done."""
    real = datakit.load_recipe

    def without_the_key(*args: Any, **kwargs: Any) -> Any:
        recipe = real(*args, **kwargs)
        del recipe.data["compare"]["metrics"]
        return recipe

    monkeypatch.setattr(datakit, "load_recipe", without_the_key)
    mark_done(small_recipe)
    st = statuses(small_recipe)
    assert {n: s for n, (s, _) in st.items() if s != "done"} == {"compare": "stale"}
    assert st["compare"][1][0].startswith("changed params: compare.metrics")

"""The staged plan: stages declared as data, fingerprints, and done / stale (why) / pending.

Up to date means, in this order: same fingerprint (params read, input hashes, upstream
fingerprints, library versions), then the outputs are present with their recorded sizes.
Imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from runner.changes import explain
from runner.checkpoints import attempt_dir, newest_valid, step_of
from runner.data.sources import data_identity, dataset_identity
from runner.data.templates import prompt_keeps_newline, template_identity
from runner.models.resolve import tokenizer_identity, weights_identity
from runner.recipe import Recipe, flatten
from runner.recipe.mix import has_sources
from runner.recipe.schema import quiet_defaults
from runner.rundir import (
    ADAPTER,
    COMPARE_ROWS,
    COMPARE_TABLE,
    FORMATTED,
    LOAD_REPORT,
    LOG_HISTORY,
    REPORT,
    TOKENIZED,
    TRAIN_FINAL,
    CorruptState,
    read_state,
    state_path,
)
from runner.state import fingerprint, path_size


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # runner.stages.<module> has run(ctx) -> metrics
    reads: tuple[str, ...]  # recipe key paths (a table name reads the whole table)
    ignores: tuple[str, ...] = ()  # keys under `reads` that cannot change the result
    upstream: tuple[str, ...] = ()
    inputs: Callable[[Recipe], dict[str, Any]] | None = None  # content identity of input files
    outputs: tuple[str, ...] = ()  # paths in the run dir
    libraries: tuple[str, ...] = ()


def format_inputs(recipe: Recipe) -> dict[str, Any]:
    """The format stage's input files: the data (local files' hashes or the hub id and revision)
    and the template files; of every [[dataset.sources]] table for a mix."""
    if has_sources(recipe):  # newer than the prompt's kept newline: no older runs to tell apart
        return data_identity(recipe)
    inputs: dict[str, Any] = {
        "dataset": dataset_identity(recipe),
        "templates": template_identity(recipe),
    }
    if prompt_keeps_newline(recipe):
        # the same prompt text renders with its final newline since the runner stopped dropping
        # it: runs formatted before must re-run; other recipes keep their fingerprints
        inputs["prompt_final_newline"] = "kept"
    return inputs


STAGES: tuple[Stage, ...] = (
    Stage(
        "format",
        "format",
        reads=("recipe.seed", "dataset", "template"),
        ignores=("template.format",),  # how text becomes tokens: read by tokenize
        inputs=format_inputs,
        outputs=(FORMATTED,),
        libraries=("datasets", "jinja2"),
    ),
    Stage(
        "tokenize",
        "tokenize",
        reads=(
            "tokenize",
            "template.format",
            "model.name_or_path",
            "model.revision",
            "model.tiny.corpus",
            "model.tiny.vocab_size",
            "model.tiny.seed",
        ),
        ignores=("tokenize.num_proc",),
        upstream=("format",),
        inputs=lambda r: {"tokenizer": tokenizer_identity(r)},
        outputs=(TOKENIZED,),
        libraries=("datasets", "transformers", "tokenizers"),
    ),
    Stage(
        "quantize-load",
        "quantize_load",
        reads=("model", "quantization", "lora"),
        inputs=lambda r: {"model": weights_identity(r)},
        outputs=(LOAD_REPORT,),
        libraries=("torch", "transformers", "peft", "bitsandbytes"),
    ),
    Stage(
        "train",
        "train",
        reads=(
            "recipe.seed",
            "train",
            "launch.num_processes",
            "launch.num_machines",
            "launch.strategy",
        ),
        ignores=(
            "train.logging_steps",
            "train.save_steps",
            "train.save_total_limit",
            "train.report_to",
            "train.dataloader_num_workers",
            "train.on_changed_settings",
            "train.memory_budget_gib",  # picks layouts that train the same math
        ),
        upstream=("tokenize", "quantize-load"),
        outputs=(TRAIN_FINAL, LOG_HISTORY),
        libraries=("torch", "transformers", "peft", "bitsandbytes", "accelerate"),
    ),
    Stage("save", "save", reads=(), upstream=("train",), outputs=(ADAPTER,), libraries=("peft",)),
    Stage(
        "compare",
        "compare",
        reads=("recipe.seed", "compare"),
        upstream=("save", "tokenize"),
        outputs=(COMPARE_TABLE, COMPARE_ROWS, REPORT),
        # the scorers too (runner/report/metrics.py): a new version may score differently
        libraries=(
            "torch",
            "transformers",
            "peft",
            "bitsandbytes",
            "jieba",
            "nltk",
            "rouge-chinese",
            "sacrebleu",
        ),
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def stage_params(recipe: Recipe, stage: Stage) -> dict[str, Any]:
    flat = flatten(recipe.data)
    quiet = quiet_defaults()
    picked = {}
    for key, value in flat.items():
        if key in quiet and value == quiet[key]:  # added later: existing runs stay done
            continue
        if any(key == r or key.startswith(r + ".") for r in stage.reads) and not any(
            key == i or key.startswith(i + ".") for i in stage.ignores
        ):
            if key == "dataset.sources" and isinstance(value, list):  # named one key at a time
                for i, source in enumerate(value):
                    for sub, v in flatten(source).items():
                        picked[f"dataset.sources[{i}].{sub}"] = v
                continue
            picked[key] = value
    return picked


@dataclass
class StageStatus:
    stage: Stage
    status: str  # done | stale | pending
    reasons: list[str]
    fingerprint: str
    params: dict[str, Any]
    inputs: dict[str, Any]
    upstream: dict[str, str]
    libraries: dict[str, str]
    state: dict[str, Any] | None = field(default=None)

    @property
    def name(self) -> str:
        return self.stage.name

    def identity(self) -> dict[str, Any]:
        """What the stage read, as state files and checkpoint attempts record it."""
        return {
            "fingerprint": self.fingerprint,
            "params": self.params,
            "inputs": self.inputs,
            "upstream": self.upstream,
            "libraries": self.libraries,
        }


def compute_plan(recipe: Recipe) -> list[StageStatus]:
    run_dir = recipe.run_dir
    fps: dict[str, str] = {}
    will_run: set[str] = set()
    plan = []
    for stage in STAGES:
        params = stage_params(recipe, stage)
        inputs = stage.inputs(recipe) if stage.inputs else {}
        upstream = {u: fps[u] for u in stage.upstream}
        libs = library_versions(stage.libraries)
        fp = fingerprint(
            {
                "stage": stage.name,
                "params": params,
                "inputs": inputs,
                "upstream": upstream,
                "libraries": libs,
            }
        )
        fps[stage.name] = fp
        status = StageStatus(stage, "done", [], fp, params, inputs, upstream, libs)
        try:
            stored = read_state(state_path(run_dir, stage.name))
        except CorruptState as e:
            stored = None
            status.status, status.reasons = "pending", [f"corrupt state: {e}"]
        status.state = stored
        if stored is None:
            if not status.reasons:
                status.status, status.reasons = "pending", ["never ran"]
        elif stored["fingerprint"] != fp:
            status.status, status.reasons = "stale", explain(stored, status)
        elif stored["status"] != "done":
            status.status = "pending"
            last = "did not finish" if stored["status"] == "running" else stored["status"]
            status.reasons = [f"last run {last}" + _resume_hint(run_dir, stored)]
        else:
            missing = _missing_outputs(run_dir, stage, stored)
            if missing:
                status.status, status.reasons = "stale", missing
            else:
                ran_up = [u for u in stage.upstream if u in will_run]
                if ran_up:
                    status.status, status.reasons = (
                        "stale",
                        [f"upstream re-runs: {', '.join(ran_up)}"],
                    )
        if status.status != "done":
            will_run.add(stage.name)
        plan.append(status)
    return plan


def _resume_hint(run_dir: Path, stored: dict[str, Any]) -> str:
    """Where training resumes: the newest valid checkpoint on disk (the state file may lag it)."""
    if stored.get("stage") != "train":
        return ""
    newest, _ = newest_valid(attempt_dir(run_dir, stored["fingerprint"]))
    return f"; resumes from checkpoint {step_of(newest)}" if newest else ""


def _missing_outputs(run_dir: Path, stage: Stage, stored: dict[str, Any]) -> list[str]:
    recorded = {o["path"]: o for o in stored.get("outputs", [])}
    problems = []
    if stage.name == "train" and stored.get("metrics", {}).get("machine_rank"):
        return []  # multi-node: trained with machine 0, which holds the outputs
    for rel in stage.outputs:
        size = path_size(run_dir / rel)
        if size is None:
            problems.append(f"output missing: {rel}")
        elif rel in recorded and recorded[rel]["size"] != size:
            problems.append(f"output changed: {rel}")
    return problems

"""`recipe export`: the trained adapter alone with a model card, or a merged model.

Merged: the base is loaded NOT quantized, in the recipe's compute dtype, the adapter is folded
into it (peft's merge_and_unload) and the result saved with its tokenizer, so that
`AutoModelForCausalLM.from_pretrained(OUT)` needs neither peft nor bitsandbytes. Its greedy
outputs are those of the same de-quantized base with the adapter unmerged; they can differ from
the runner's 4-bit base + adapter, whose weights are the NF4-rounded ones.
Both are written to a hidden sibling folder and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.quiet import quiet_libraries
from runner.recipe import Recipe
from runner.state import fresh_tmp_dir, replace_dir
from runner.use import Echo, require_adapter, shown, stale_adapter_note


def check_destination(out: Path, recipe: Recipe) -> None:
    """OUT must be new or empty, and not the run's own adapter folder."""
    out = out.resolve()
    if out == require_adapter(recipe).resolve():
        raise RecipeError(
            f"{shown(out)}: is the run's own adapter folder; export to another folder"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecipeError(
            f"{shown(out)}: exists and is not empty; choose a new folder or remove it"
        )


def _state_metrics(recipe: Recipe, stage: str) -> dict[str, Any]:
    from runner.state import state_metrics

    return state_metrics(recipe.run_dir / "state" / f"{stage}.json")


def _is_hub_id(name: str) -> bool:
    return ":" not in name and name.count("/") == 1 and not Path(name).expanduser().exists()


def model_card(recipe: Recipe, *, merged: bool) -> str:
    """README.md: base model, recipe, data, training, before/after metrics; hub metadata on top."""
    from huggingface_hub import ModelCard, ModelCardData

    from runner.report.table import metric_lines

    base = str(recipe.get("model.name_or_path"))
    revision = recipe.get("model.revision")
    ds = recipe.section("dataset")
    fmt, train, compare = (_state_metrics(recipe, s) for s in ("format", "train", "compare"))
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="transformers" if merged else "peft",
        datasets=[ds["path"]] if _is_hub_id(str(ds.get("path", ""))) else None,
        tags=["lora", "qlora", "recipe-runner"] + (["merged"] if merged else []),
        pipeline_tag="text-generation",
    )
    what = "Merged model" if merged else "LoRA adapter"
    rows = ", ".join(
        f"{fmt[k]} {name}"
        for k, name in (("train_rows", "training rows"), ("heldout_rows", "held out"))
        if k in fmt
    )
    held = ds.get("heldout_split") or f"{ds.get('heldout_rows')} rows"
    lines = [
        f"# {what}: {recipe.name}",
        "",
        f"- base model: `{base}`" + (f" (revision `{revision}`)" if revision else ""),
        "- recipe: `recipe.toml` (resolved: defaults and overrides applied); "
        "`recipe run recipe.toml` trains it again",
        f"- data: `{ds.get('path')}`, split `{ds.get('split')}`, held out `{held}`"
        + (f" ({rows})" if rows else ""),
    ]
    if train:
        lines.append(
            f"- training: {train.get('global_step')} steps, final train loss "
            f"{train.get('train_loss')}"
        )
    if merged:
        lines.append(
            f"- weights: the adapter folded into the de-quantized base in "
            f"`{recipe.get('quantization.bnb_4bit_compute_dtype')}` compute dtype"
        )
    lines += ["", "## Metrics before / after fine-tuning", ""]
    if compare.get("before"):
        lines += [
            *metric_lines(compare),
            "",
            f"{compare.get('scored_examples')} held-out examples, decoding as in `[compare]`.",
        ]
    else:
        lines.append("No compare metrics yet (`recipe run` writes them).")
    lines += ["", "## Use", "", "```python"]
    if merged:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        ]
    else:
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "PATH")',
        ]
    lines += ["```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def export_adapter(recipe: Recipe, out: Path, log: Echo) -> Path:
    """The adapter folder (weights, config, tokenizer, resolved recipe, metrics) + a model card."""
    quiet_libraries()
    src = require_adapter(recipe)
    check_destination(out, recipe)
    note = stale_adapter_note(recipe)
    if note:
        log(note)
    tmp = fresh_tmp_dir(out.resolve())
    shutil.copytree(src, tmp)
    (tmp / "README.md").write_text(model_card(recipe, merged=False), encoding="utf-8")
    replace_dir(tmp, out.resolve())
    log(f"adapter exported to {shown(out.resolve())}")
    return out


def merged_model(recipe: Recipe, log: Echo) -> tuple[Any, Any]:
    """(model, tokenizer): the de-quantized base with the adapter merged in, compute dtype."""
    quiet_libraries()  # before the heavy imports: progress bars and import-time notices off
    from peft import PeftModel

    from runner.models.load import load_base, load_tokenizer
    from runner.models.resolve import materialize

    adapter = require_adapter(recipe)
    folder = materialize(recipe, log)
    base = load_base(recipe, folder, quantize=False)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    model.eval()
    return model, load_tokenizer(folder)


def export_merged(recipe: Recipe, out: Path, log: Echo) -> Path:
    quiet_libraries()
    require_adapter(recipe)
    check_destination(out, recipe)
    note = stale_adapter_note(recipe)
    if note:
        log(note)
    model, tok = merged_model(recipe, log)
    tmp = fresh_tmp_dir(out.resolve())
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    resolved = recipe.run_dir / "adapter" / "recipe.toml"
    if resolved.is_file():
        shutil.copy2(resolved, tmp / "recipe.toml")
    (tmp / "README.md").write_text(model_card(recipe, merged=True), encoding="utf-8")
    replace_dir(tmp, out.resolve())
    size = sum(p.stat().st_size for p in out.resolve().rglob("*") if p.is_file())
    log(f"merged model ({model.dtype}) exported to {shown(out.resolve())} ({size / 2**20:.1f} MiB)")
    return out

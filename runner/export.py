"""`recipe export`: the trained adapter alone with a model card, a merged model, or the adapter
in ChatGLM3's module names.

Merged: the base is loaded NOT quantized, in the recipe's compute dtype, the adapter is folded
into it (peft's merge_and_unload) and the result saved with its tokenizer, so that
`AutoModelForCausalLM.from_pretrained(OUT)` needs neither peft nor bitsandbytes. Its greedy
outputs are those of the same de-quantized base with the adapter unmerged; they can differ from
the runner's 4-bit base + adapter, whose weights are the NF4-rounded ones.
ChatGLM3: the runner trains ChatGLM3 checkpoints as transformers' native GLM, so its adapter names
q_proj/k_proj/v_proj, o_proj, gate_up_proj and down_proj. People who serve the original model
(THUDM's remote code) need query_key_value, dense, dense_h_to_4h and dense_4h_to_h:
--chatglm-adapter writes the same adapter in those names (runner.models.chatglm.adapters; the
q/k/v LoRAs are fused exactly, delta W unchanged), with a README.
All three are written to a hidden sibling folder and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.portable import Base, base_model, portable_recipe, write_portable_recipe
from runner.quiet import quiet_libraries
from runner.recipe import Recipe
from runner.recipe.layers import is_local_path
from runner.state import fresh_tmp_dir, replace_dir, write_json_atomic
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
    from runner.rundir import state_metrics, state_path

    return state_metrics(state_path(recipe.run_dir, stage))


def _paths(ds: dict[str, Any]) -> str:
    return ", ".join(str(s["path"]) for s in ds["sources"])


def _hub_datasets(recipe: Recipe) -> list[str] | None:
    """The hub data sets the recipe reads (dataset.path, or each source's), for the card."""
    paths = [str(s["path"]) for s in recipe.section("dataset").get("sources") or []] or [
        str(recipe.get("dataset.path"))
    ]
    hub = [p for p in paths if not is_local_path(("dataset", "path"), p, recipe.base_dir)]
    return hub or None


def _base_lines(base: Base, recipe: Recipe) -> list[str]:
    """The card's base model line, and for the built-in model how to get it."""
    if base.kind == "hub":
        return [
            f"- base model: `{base.name}` on the Hugging Face hub"
            + (f" (revision `{base.revision}`)" if base.revision else "")
        ]
    if base.kind == "local":
        return [f"- base model: the local folder `{base.name}` (relative to this folder)"]
    return [
        f"- base model: `{base.name}`, the recipe runner's built-in tiny GLM, built from "
        "`[model.tiny]` of `recipe.toml` and its corpus (cached by their content). To get it, "
        "run `recipe run recipe.toml --until quantize-load` in this folder; "
        "`runs/" + recipe.name + "/model/load.json` names the folder (`model_folder`)"
    ]


def _base_load(base: Base) -> str:
    """The Python argument list that loads the base."""
    if base.kind == "builtin":
        return '"TINY_MODEL_FOLDER"'
    return f'"{base.name}"' + (f', revision="{base.revision}"' if base.revision else "")


def model_card(recipe: Recipe, *, merged: bool, out: Path, data_path: str | None = None) -> str:
    """README.md: base model, recipe, data, training, before/after metrics; hub metadata on top.
    `out` is the export folder (a local base is named relative to it); `data_path` the data as
    the exported recipe names it."""
    from huggingface_hub import ModelCard, ModelCardData

    from runner.report.table import metric_lines

    base = base_model(recipe, out)
    ds = recipe.section("dataset")
    fmt, train, compare = (_state_metrics(recipe, s) for s in ("format", "train", "compare"))
    data = ModelCardData(
        base_model=base.name if base.kind == "hub" else None,
        library_name="transformers" if merged else "peft",
        datasets=_hub_datasets(recipe),
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
        *_base_lines(base, recipe),
        "- recipe: `recipe.toml` (resolved: defaults and overrides applied; the files it reads "
        "are under `inputs/`); `recipe run recipe.toml` in this folder trains it again",
        (
            f"- data: `{data_path or ds.get('path')}`, split `{ds.get('split')}`, held out `{held}`"
            if not ds.get("sources")
            else f"- data: a mix of {len(ds['sources'])} sources: `{data_path or _paths(ds)}`"
        )
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
            *(
                ["# TINY_MODEL_FOLDER: model_folder in runs/<name>/model/load.json (above)"]
                if base.kind == "builtin"
                else []
            ),
            f"base = AutoModelForCausalLM.from_pretrained({_base_load(base)})",
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
    final = out.resolve()
    portable = portable_recipe(recipe, final)
    tmp = fresh_tmp_dir(final)
    shutil.copytree(src, tmp)
    _name_the_base(tmp / "adapter_config.json", base_model(recipe, final))
    _drop_local_paths(tmp / "metrics.json")
    write_portable_recipe(recipe, tmp, portable)
    card = model_card(recipe, merged=False, out=final, data_path=portable.data_path)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    replace_dir(tmp, final)
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
    final = out.resolve()
    portable = portable_recipe(recipe, final)
    model, tok = merged_model(recipe, log)
    tmp = fresh_tmp_dir(final)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    write_portable_recipe(recipe, tmp, portable)
    card = model_card(recipe, merged=True, out=final, data_path=portable.data_path)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    replace_dir(tmp, final)
    size = sum(p.stat().st_size for p in out.resolve().rglob("*") if p.is_file())
    log(f"merged model ({model.dtype}) exported to {shown(out.resolve())} ({size / 2**20:.1f} MiB)")
    return out


def chatglm_config(recipe: Recipe) -> dict[str, Any]:
    """The original ChatGLM3 config.json of the recipe's model; RecipeError if it is not one."""
    from runner.models import resolve

    ident = resolve.model_identity(recipe)
    where = f"{recipe.origin('model.name_or_path')}: $.model.name_or_path"
    name = recipe.get("model.name_or_path")
    if ident["kind"] != "builtin":
        config = resolve.chatglm_source_config(resolve.converted_folder(ident))
        if config is not None:
            return config
        local = recipe.resolve(name)
        if ident["kind"] == "local" and resolve.is_chatglm_folder(local):
            data: dict[str, Any] = json.loads((local / "config.json").read_text(encoding="utf-8"))
            return data
        if ident["kind"] == "hub":
            raise RecipeError(
                f"{where}: {name!r} has not been converted here yet; `recipe run` it first"
            )
    raise RecipeError(
        f"{where}: {name!r} is not a ChatGLM3 checkpoint, so its adapter already "
        "uses the model's own module names; export it with --adapter OUT"
    )


def export_chatglm_adapter(recipe: Recipe, out: Path, log: Echo) -> Path:
    """The adapter in ChatGLM3's module names, with a README; RecipeError for a model that is
    not ChatGLM3 or an adapter that has no exact ChatGLM3 form (nothing is written then)."""
    import pickle

    from safetensors import SafetensorError

    from runner.models.chatglm.adapters import convert_adapter_dir

    src = require_adapter(recipe)
    check_destination(out, recipe)
    config = chatglm_config(recipe)
    again = f"`recipe run {shown(recipe.path)}` trains it again"
    weights = _adapter_weights(src, again)
    note = stale_adapter_note(recipe)
    if note:
        log(note)
    final = out.resolve()
    named = base_model(recipe, final)
    base = named.name
    tmp = fresh_tmp_dir(final)
    try:
        convert_adapter_dir(
            src, tmp, to="chatglm", model_config=config, base_model_name_or_path=base
        )
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused it: nothing ran
        raise RecipeError(
            f"{shown(weights)}: not a state dict that loads without running code "
            f"(torch.load weights_only refused it); {again}"
        ) from None
    except SafetensorError as e:
        raise RecipeError(
            f"{shown(weights)}: not a readable safetensors file ({e}); {again}"
        ) from None
    except (ValueError, TypeError, RuntimeError) as e:
        # DoRA, fan_in_fan_out, an unknown module, values of the wrong type or shape: nothing
        # written. The first line only: torch's messages go on for paragraphs.
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise RecipeError(
            f"{shown(src)}: cannot write this adapter in ChatGLM3 names: {first}"
        ) from None
    _name_the_base(tmp / "adapter_config.json", named)  # and the hub revision
    written = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
    targets = written.get("target_modules")
    (tmp / "README.md").write_text(
        f"# LoRA adapter in ChatGLM3 module names: {recipe.name}\n\n"
        f"- base model: `{base}` (the original ChatGLM3 code)\n"
        f"- target modules: {', '.join(targets) if isinstance(targets, list) else targets}\n"
        "- trained by `recipe` on the native GLM conversion of the same weights and converted "
        "exactly (the same weight updates)\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModel\n"
        f'base = AutoModel.from_pretrained("{base}", trust_remote_code=True)\n'
        'model = PeftModel.from_pretrained(base, "PATH")\n```\n',
        encoding="utf-8",
    )
    replace_dir(tmp, final)
    log(f"adapter in ChatGLM3 names exported to {shown(final)}")
    return out


def _name_the_base(config_file: Path, base: Base) -> None:
    """adapter_config.json names the base as the export does (peft writes the folder it loaded,
    an absolute cache path), with the hub revision that peft's `revision` field carries."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base.name
    if base.revision:
        config["revision"] = base.revision
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _drop_local_paths(metrics_file: Path) -> None:
    """metrics.json without the run's absolute paths (the adapter and model folders of the
    machine that trained it): they mean nothing where the export goes."""
    if not metrics_file.is_file():
        return
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))

    def keep(value: Any) -> bool:
        return not (isinstance(value, str) and Path(value).is_absolute())

    if isinstance(metrics, dict):
        for stage in metrics.values():
            if isinstance(stage, dict):
                for key in [k for k, v in stage.items() if not keep(v)]:
                    del stage[key]
        write_json_atomic(metrics_file, metrics)


def _adapter_weights(src: Path, again: str) -> Path:
    """The adapter's weight file, after checking that its config is a JSON object: a damaged
    (or planted) adapter folder gets one line naming the file instead of a traceback."""
    config_file = src / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecipeError(f"{shown(config_file)}: not readable JSON ({e}); {again}") from None
    if not isinstance(config, dict):
        raise RecipeError(
            f"{shown(config_file)}: expected a JSON object, got {type(config).__name__}; {again}"
        )
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (src / name).is_file():
            return src / name
    raise RecipeError(
        f"{shown(src)}: has no adapter_model.safetensors or adapter_model.bin; {again}"
    )

"""`recipe export RECIPE --chatglm-adapter OUT`: the trained adapter in ChatGLM3's module names.

The runner trains ChatGLM3 checkpoints as transformers' native GLM, so its adapter names
q_proj/k_proj/v_proj, o_proj, gate_up_proj and down_proj. People who serve the original model
(THUDM's remote code) need query_key_value, dense, dense_h_to_4h and dense_4h_to_h: this writes
the same adapter in those names (runner.models.chatglm.convert_adapter_dir; the q/k/v LoRAs are
fused exactly, delta W unchanged), with a README, to a hidden sibling folder renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.recipe import Recipe


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


def export_chatglm_adapter(recipe: Recipe, out: Path, log: Callable[[str], None]) -> Path:
    from runner.export import check_destination
    from runner.models.chatglm import convert_adapter_dir
    from runner.state import fresh_tmp_dir, replace_dir
    from runner.use import require_adapter, shown, stale_adapter_note

    src = require_adapter(recipe)
    check_destination(out, recipe)
    config = chatglm_config(recipe)
    note = stale_adapter_note(recipe)
    if note:
        log(note)
    base = str(recipe.get("model.name_or_path"))
    final = out.resolve()
    tmp = fresh_tmp_dir(final)
    try:
        convert_adapter_dir(
            src, tmp, to="chatglm", model_config=config, base_model_name_or_path=base
        )
    except ValueError as e:  # DoRA, fan_in_fan_out, an unknown module: nothing written
        raise RecipeError(
            f"{shown(src)}: cannot write this adapter in ChatGLM3 names: {e}"
        ) from None
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

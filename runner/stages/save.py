"""save: the adapter, the tokenizer, the resolved recipe and the metrics, in one folder."""

from __future__ import annotations

import shutil
from typing import Any

from runner.context import Context
from runner.plan import STAGE_NAMES
from runner.rundir import ADAPTER, RESOLVED_RECIPE, TRAIN_FINAL, state_metrics, state_path
from runner.state import fresh_tmp_dir, replace_dir, write_json_atomic


def collected_metrics(ctx: Context) -> dict[str, Any]:
    out = {}
    for name in STAGE_NAMES:
        path = state_path(ctx.run_dir, name)
        if path.is_file():
            out[name] = state_metrics(path)
    return out


def run(ctx: Context) -> dict[str, Any]:
    from runner.models.load import load_tokenizer
    from runner.models.resolve import tokenizer_folder

    recipe = ctx.recipe
    final = ctx.path(ADAPTER)
    tmp = fresh_tmp_dir(final)
    shutil.copytree(ctx.path(TRAIN_FINAL), tmp, dirs_exist_ok=True)
    for junk in ("training_args.bin",):
        (tmp / junk).unlink(missing_ok=True)
    load_tokenizer(tokenizer_folder(recipe, ctx.log)).save_pretrained(str(tmp))
    shutil.copy2(ctx.path(RESOLVED_RECIPE), tmp / "recipe.toml")
    metrics = collected_metrics(ctx)
    write_json_atomic(tmp / "metrics.json", metrics)
    base = recipe.get("model.name_or_path")
    (tmp / "README.md").write_text(
        f"# LoRA adapter: {recipe.name}\n\n"
        f"- base model: `{base}`\n- recipe: `recipe.toml` (resolved)\n- metrics: `metrics.json`\n\n"
        "Load it with\n\n```python\nfrom peft import PeftModel\n"
        'model = PeftModel.from_pretrained(base_model, "adapter")\n```\n',
        encoding="utf-8",
    )
    replace_dir(tmp, final)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    ctx.log(f"save: adapter in {final} ({size / 2**20:.1f} MiB)")
    return {"adapter_dir": str(final), "bytes": size}

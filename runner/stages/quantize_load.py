"""quantize-load: the base model with the recipe's BitsAndBytesConfig, prepared, LoRA attached.

When the train stage is launched in several processes (`--gpus N`), each process loads its own
model on its own GPU: loading one here too would only hold GPU 0's memory and take time. The
model is then built on the meta device (no weights read, as `recipe plan --model` does): the
LoRA targets and parameter counts are the same, and the checks still run before any training
process starts.
"""

from __future__ import annotations

from typing import Any

from runner.context import Context
from runner.rundir import LOAD_REPORT
from runner.state import write_json_atomic


def run(ctx: Context) -> dict[str, Any]:
    from runner.launch import is_launched
    from runner.models.resolve import materialize

    folder = materialize(ctx.recipe, ctx.log)  # once, here: never by several processes at once
    if is_launched(ctx.recipe):
        report = meta_report(ctx)
    else:
        from runner.models.load import load_for_training

        model, report = load_for_training(ctx.recipe, folder)
        ctx.model = model  # train reuses it when it runs in the same process
    report["model_folder"] = str(folder)
    write_json_atomic(ctx.path(LOAD_REPORT), report)
    targets = report["target_modules"]
    ctx.log(
        f"quantize-load: {report['adapted_modules']} modules adapted "
        f"({', '.join(targets) if isinstance(targets, list) else targets}); trainable "
        f"{report['trainable_params']:,} of {report['all_params']:,} params "
        f"({report['trainable_percent']}%)"
        + (
            "; checked on the meta device, each training process loads its own"
            if report.get("loaded") == "meta"
            else ""
        )
    )
    return report


def meta_report(ctx: Context) -> dict[str, Any]:
    """load_for_training's report from the model built on the meta device."""
    from runner.models.estimate import plan_model

    plan = plan_model(ctx.recipe)
    total = plan.all_params + plan.trainable  # the base's, plus the adapters' (as peft counts)
    return {
        "model_type": plan.model_type,
        "target_modules": plan.targets,
        "module_naming": plan.naming,
        "adapted_modules": plan.adapted_modules,
        "trainable_params": plan.trainable,
        "all_params": total,
        "trainable_percent": round(100 * plan.trainable / total, 4),
        "loaded": "meta",
    }

"""quantize-load: the base model with the recipe's BitsAndBytesConfig, prepared, LoRA attached."""

from __future__ import annotations

from typing import Any

from runner.context import Context
from runner.state import write_json_atomic


def run(ctx: Context) -> dict[str, Any]:
    from runner.models.load import load_for_training
    from runner.models.resolve import materialize

    folder = materialize(ctx.recipe, ctx.log)
    model, report = load_for_training(ctx.recipe, folder)
    report["model_folder"] = str(folder)
    ctx.memo["model"] = model  # train reuses it when it runs in the same process
    write_json_atomic(ctx.path("model/load.json"), report)
    targets = report["target_modules"]
    ctx.log(
        f"quantize-load: {report['adapted_modules']} modules adapted "
        f"({', '.join(targets) if isinstance(targets, list) else targets}); trainable "
        f"{report['trainable_params']:,} of {report['all_params']:,} params "
        f"({report['trainable_percent']}%)"
    )
    return report

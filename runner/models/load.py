"""Load a base model the way a recipe says: quantized (bitsandbytes), prepared, with LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.models.chatglm import CHATGLM_TO_GLM_TARGETS
from runner.recipe import Recipe



def device_map() -> Any:
    import os

    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def compute_dtype(recipe: Recipe) -> Any:
    import torch

    name = recipe.get("quantization.bnb_4bit_compute_dtype")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def quantization_config(recipe: Recipe) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    q = recipe.section("quantization")
    if q["load_in_4bit"]:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=q["bnb_4bit_use_double_quant"],
            bnb_4bit_compute_dtype=compute_dtype(recipe),
            bnb_4bit_quant_storage=getattr(torch, q["bnb_4bit_quant_storage"]),
        )
    if q["load_in_8bit"]:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base(recipe: Recipe, folder: Path) -> Any:
    """The quantized (or plain) base model on the right device, no adapters."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization_config(recipe),
        dtype=compute_dtype(recipe),
        device_map=device_map(),
        trust_remote_code=recipe.get("model.trust_remote_code"),
        revision=recipe.get("model.revision") if not folder.is_dir() else None,
        attn_implementation=recipe.get("model.attn_implementation"),
    )


def linear_module_names(model: Any) -> list[str]:
    """Short names of the linear layers LoRA can target (lm_head excluded)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        short = full.rsplit(".", 1)[-1]
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in {
            "Linear4bit",
            "Linear8bitLt",
        }
        if is_linear and short != "lm_head":
            names.add(short)
    return sorted(names)


def resolve_targets(recipe: Recipe, model: Any) -> list[str] | str:
    """Explicit names checked against the model; "auto" via peft's mapping, else all linear."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    wanted = recipe.get("lora.target_modules")
    available = linear_module_names(model)
    if wanted == "all-linear":
        return available
    if wanted == "auto":
        mapped = MAPPING.get(model.config.model_type)
        return list(mapped) if mapped and set(mapped) <= set(available) else available
    names: list[str] = []
    for name in wanted:
        if name in available:
            names.append(name)
        elif name in CHATGLM_TO_GLM_TARGETS and set(CHATGLM_TO_GLM_TARGETS[name]) <= set(available):
            names.extend(CHATGLM_TO_GLM_TARGETS[name])  # ChatGLM3 name on the converted native GLM
        else:
            raise RecipeError(
                f"{recipe.path}: $.lora.target_modules: {name!r} is not a linear module of "
                f"{model.config.model_type}; available: {', '.join(available)}"
            )
    return sorted(set(names))


def lora_config(recipe: Recipe, targets: list[str] | str) -> Any:
    from peft import LoraConfig

    lora = recipe.section("lora")
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=lora["lora_dropout"],
        target_modules=targets,
        bias=lora["bias"],
        use_dora=lora["use_dora"],
        use_rslora=lora["use_rslora"],
        modules_to_save=lora["modules_to_save"] or None,
        layers_to_transform=lora["layers_to_transform"],
        task_type="CAUSAL_LM",
    )


def load_for_training(recipe: Recipe, folder: Path) -> tuple[Any, dict[str, Any]]:
    """Base model quantized, prepared for k-bit training, with fresh LoRA adapters."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(recipe.seed)
    model = load_base(recipe, folder)
    targets = resolve_targets(recipe, model)
    checkpointing = recipe.get("train.gradient_checkpointing")
    if quantization_config(recipe) is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(recipe, targets))
    trainable, total = model.get_nb_trainable_parameters()
    report = {
        "model_type": model.config.model_type,
        "target_modules": targets,
        "adapted_modules": sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A")),
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "memory": memory_in_use(),
    }
    return model, report


def memory_in_use() -> dict[str, float]:
    import resource

    import torch

    out = {
        "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    }
    if torch.cuda.is_available():
        out["cuda_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        out["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out

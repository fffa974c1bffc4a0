"""Load a base model the way a recipe says: quantized (bitsandbytes), prepared, with LoRA."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.models.chatglm.names import (
    CHATGLM_TO_GLM_TARGETS,
    GLM_TO_CHATGLM_TARGETS,
    translate_target_modules_to_chatglm,
)
from runner.precision import for_recipe, probe
from runner.recipe import Recipe


def unwrapped(model: Any) -> Any:
    """The transformers model itself: under peft's wrapper when there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def device_map() -> Any:
    import os

    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def compute_dtype(recipe: Recipe) -> Any:
    import torch

    return getattr(torch, for_recipe(recipe).compute)


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

    from runner.models.resolve import tokenizer_problem

    problem = tokenizer_problem(folder)
    if problem:
        raise RecipeError(problem)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:  # missing or mismatched tokenizer files
        raise RecipeError(
            f"{folder}: cannot load the tokenizer: "
            f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}; the folder needs the "
            "model's tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base(recipe: Recipe, folder: Path, *, quantize: bool = True) -> Any:
    """The quantized (or plain) base model on the right device, no adapters; `quantize=False`
    loads it unquantized in the compute dtype (to merge an adapter into)."""
    import transformers
    from transformers import AutoModelForCausalLM

    if folder.is_dir() and not (folder / "config.json").is_file():
        raise RecipeError(
            f"{folder}: no config.json; loading the model needs it next to the weights "
            "(copy the model's config.json into the folder)"
        )
    transformers.logging.set_verbosity_error()
    if not sys.stderr.isatty():  # "Loading weights" bars are noise in logs and captured output
        transformers.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization_config(recipe) if quantize else None,
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


def _did_you_mean(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_label(model: Any, naming: str) -> str:
    return "ChatGLM3" if naming == "chatglm" else str(model.config.model_type)


def resolve_targets(recipe: Recipe, model: Any, naming: str = "native") -> list[str]:
    """The native module names that get LoRA adapters.

    "all-linear": every linear layer but the output head; "auto": peft's mapping for the model
    type (ChatGLM3's when the checkpoint was converted from it), else every linear layer; a list:
    each name checked against the model's real linear module names. `naming` is "chatglm" when
    the recipe's checkpoint is ChatGLM3 (converted to native GLM): its names (query_key_value,
    dense, dense_h_to_4h, dense_4h_to_h) are the real ones then, and are translated; on a native
    GLM model they are accepted too, as aliases of the modules they became.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    wanted = recipe.get("lora.target_modules")
    available = linear_module_names(model)
    if wanted == "all-linear":
        return available
    if wanted == "auto":
        mapped = MAPPING.get("chatglm" if naming == "chatglm" else model.config.model_type)
        if mapped and naming == "chatglm":
            mapped = [n for m in mapped for n in CHATGLM_TO_GLM_TARGETS.get(m, [m])]
        return sorted(set(mapped)) if mapped and set(mapped) <= set(available) else available
    if naming == "chatglm":  # the original checkpoint's names, in their usual order
        real = [c for c, glm in CHATGLM_TO_GLM_TARGETS.items() if set(glm) <= set(available)]
    else:
        real = available
    names: list[str] = []
    for name in wanted:
        glm_alias = CHATGLM_TO_GLM_TARGETS.get(name, []) if naming == "native" else []
        if glm_alias and set(glm_alias) <= set(available):  # ChatGLM3 name on a native GLM
            names.extend(glm_alias)
            continue
        if name not in real:
            if naming == "chatglm" and name in GLM_TO_CHATGLM_TARGETS:  # a native GLM name
                hint = f" (ChatGLM3 calls it {GLM_TO_CHATGLM_TARGETS[name]!r})"
            else:
                hint = _did_you_mean(name, real)
            raise RecipeError(
                f"{recipe.origin('lora.target_modules')}: $.lora.target_modules: {name!r} "
                f"is not a linear module of {_model_label(model, naming)}{hint}; "
                f"available: {', '.join(real)}"
            )
        names.extend(CHATGLM_TO_GLM_TARGETS[name] if naming == "chatglm" else [name])
    return sorted(set(names))


def module_names(model: Any, naming: str = "native") -> list[str]:
    """Short names of the modules that hold parameters themselves (what modules_to_save takes)."""
    names = set()
    for full, module in model.named_modules():
        short = full.rsplit(".", 1)[-1]
        if full and not short.isdigit() and any(True for _ in module.parameters(recurse=False)):
            names.add(short)
    if naming == "chatglm":
        names = set(translate_target_modules_to_chatglm(sorted(names)))
    return sorted(names)


def resolve_modules_to_save(recipe: Recipe, model: Any, naming: str = "native") -> list[str] | None:
    """lora.modules_to_save checked against the model (in ChatGLM3 names for a ChatGLM3 checkpoint)
    and translated to native names."""
    from runner.models.chatglm.names import translate_target_modules

    wanted = recipe.get("lora.modules_to_save")
    if not wanted:
        return None
    real = module_names(model, naming)
    for name in wanted:
        if name not in real:
            raise RecipeError(
                f"{recipe.origin('lora.modules_to_save')}: $.lora.modules_to_save: {name!r} "
                f"is not a module of {_model_label(model, naming)}{_did_you_mean(name, real)}; "
                f"available: {', '.join(real)}"
            )
    return translate_target_modules(wanted) if naming == "chatglm" else list(wanted)


def check_layers(recipe: Recipe, model: Any) -> None:
    """lora.layers_to_transform must name layers the model has."""
    wanted = recipe.get("lora.layers_to_transform")
    count = getattr(model.config, "num_hidden_layers", None)
    if not wanted or count is None:
        return
    missing = [i for i in wanted if i >= count]
    if missing:
        raise RecipeError(
            f"{recipe.origin('lora.layers_to_transform')}: $.lora.layers_to_transform: layer "
            f"{missing[0]} does not exist: {model.config.model_type} has {count} layers "
            f"(0..{count - 1})"
        )


def quantized_linears(model: Any) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the linear layers bitsandbytes quantizes: the
    Linear4bit/Linear8bitLt of a loaded model, or for an unquantized (meta) model the nn.Linear
    layers transformers would convert (all but the output head and tied weights)."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    quantized = [
        (n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
    ]
    if quantized:
        return quantized
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return [
        (n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and should_convert_module(n, skip)
    ]


def cpu_4bit_problem(recipe: Recipe, model: Any) -> str | None:
    """bitsandbytes' 4-bit CPU kernel (generation, no grad) needs in_features % 64 == 0 and
    out_features % 32 == 0; training would run and compare fail, so refuse before either."""
    if not recipe.get("quantization.load_in_4bit"):
        return None
    for name, fin, fout in quantized_linears(model):
        if fin % 64 or fout % 32:
            return (
                f"{recipe.origin('quantization.load_in_4bit')}: $.quantization.load_in_4bit: "
                "on the CPU, bitsandbytes' 4-bit kernel needs linear layers with in_features "
                "a multiple of 64 and out_features a multiple of 32; "
                f"{name} is {fin} -> {fout}: "
                "set load_in_4bit = false (plain LoRA) or load_in_8bit = true, or run on a GPU"
            )
    return None


def precision_problems(recipe: Recipe, cuda: bool, bf16_ok: bool) -> list[str]:
    """dtype settings the hardware cannot run, one line each (the rules that need no hardware
    are cross-field rules of the recipe loader)."""
    problems = []
    name = recipe.get("quantization.bnb_4bit_compute_dtype")
    if cuda and not bf16_ok and name == "bfloat16" and recipe.get("quantization.load_in_4bit"):
        problems.append(
            f"{recipe.origin('quantization.bnb_4bit_compute_dtype')}: "
            "$.quantization.bnb_4bit_compute_dtype: this GPU has no bf16 support; "
            'use "float16" or "auto"'
        )
    if cuda and not bf16_ok and recipe.get("train.bf16") is True:
        problems.append(
            f"{recipe.origin('train.bf16')}: $.train.bf16: this GPU has no bf16 "
            'support; set bf16 = "auto" (or fp16 = true)'
        )
    if not cuda and recipe.get("train.fp16"):
        problems.append(
            f"{recipe.origin('train.fp16')}: $.train.fp16: fp16 mixed precision "
            "needs a CUDA GPU and none is here; set fp16 = false "
            '(bf16 = "auto" picks for you)'
        )
    return problems


def hardware() -> tuple[bool, bool]:
    """(CUDA available, bf16 supported on it)."""
    hw = probe()
    return hw.cuda, hw.bf16


def lora_config(
    recipe: Recipe, targets: list[str] | str, modules_to_save: list[str] | None = None
) -> Any:
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
        modules_to_save=(
            modules_to_save if modules_to_save is not None else lora["modules_to_save"] or None
        ),
        layers_to_transform=lora["layers_to_transform"],
        task_type="CAUSAL_LM",
    )


def upcast_to_fp32(recipe: Recipe) -> bool:
    """peft's fp32 upcast of unquantized layers: on unless the compute dtype is bf16 (auto)."""
    return for_recipe(recipe).upcast


def load_for_training(recipe: Recipe, folder: Path) -> tuple[Any, dict[str, Any]]:
    """Base model quantized, prepared for k-bit training, with fresh LoRA adapters."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from runner.models.resolve import chatglm_source_config

    cuda, bf16_ok = hardware()
    problems = precision_problems(recipe, cuda, bf16_ok)
    if not cuda and recipe.get("model.attn_implementation") == "flex_attention":
        problems.append(
            f"{recipe.origin('model.attn_implementation')}: $.model.attn_implementation: "
            "flex_attention cannot train on the CPU (PyTorch has no FlexAttention backward "
            'there); use "sdpa" here (--set model.attn_implementation=sdpa)'
        )
    if problems:
        raise RecipeError(problems)
    torch.manual_seed(recipe.seed)
    model = load_base(recipe, folder)
    naming = "chatglm" if chatglm_source_config(folder) is not None else "native"
    targets = resolve_targets(recipe, model, naming)
    modules_to_save = resolve_modules_to_save(recipe, model, naming)
    check_layers(recipe, model)
    if not torch.cuda.is_available() and (problem := cpu_4bit_problem(recipe, model)):
        raise RecipeError(problem)
    # true, "auto" and N > 0 switch it on for every layer here; the train stage then picks the
    # layers (runner/models/fit.py) before it compiles them.
    checkpointing = bool(recipe.get("train.gradient_checkpointing"))
    if quantization_config(recipe) is not None and upcast_to_fp32(recipe):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(recipe, targets, modules_to_save))
    trainable, total = model.get_nb_trainable_parameters()
    report = {
        "model_type": model.config.model_type,
        "target_modules": targets,
        "module_naming": naming,
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

"""`recipe new`: commented starter recipes that validate as they are. Imports no torch."""

from __future__ import annotations

import os
import re
from pathlib import Path

from runner.errors import RecipeError
from runner.recipe.schema import SCHEMA_PATH

STARTERS = ("adgen", "adgen-tiny")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEMO_DATA = SCHEMA_PATH.resolve().parents[1] / "data" / "adgen-demo"  # in the runner's checkout

PROMPT = "用户: {{ content }}\n"

ADGEN = """\
#:schema @SCHEMA@
# ---------------------------------------------------------------------------------------------
# @NAME@: QLoRA fine-tuning, started from the `adgen` recipe (ChatGLM3-6B on AdvertiseGen):
# the base model in 4-bit NF4, LoRA adapters, paged 8-bit AdamW, generations compared before
# and after fine-tuning. Change the model, the data and the prompt (@NAME@.prompt.j2), then:
#
#     recipe validate @NAME@.toml        # schema check: every problem with its line
#     recipe plan @NAME@.toml            # the six stages and what would run
#     recipe run @NAME@.toml             # needs a CUDA GPU with ~8 GB and the network
#     recipe lock @NAME@.toml            # pin model and data commits, library versions;
#     recipe run --locked @NAME@.toml    # then refuse to run when any of them drifts
#
# Every key with its type and default: `recipe schema` (docs/recipe-reference.md in the runner).
# Paths are relative to this file.
# ---------------------------------------------------------------------------------------------

[recipe]
name = "@NAME@"                        # names the run directory: runs/@NAME@
seed = 42

[model]
name_or_path = "THUDM/chatglm3-6b"     # a hub id or a local folder
revision = "main"                      # branch, tag or commit; `recipe lock` pins the commit

[dataset]
path = "HasturOfficial/adgen"          # a hub id, or a local jsonl/json/csv/parquet file or folder
split = "train[:1%]"                   # with slicing: train, train[:1%], train[100:200]
heldout_split = "validation[:50]"      # rows for the before/after comparison
# columns = { content = "input", summary = "output" }   # rename columns to the template's names

[template]                             # Jinja, sandboxed; a row's columns are its variables
prompt_file = "@NAME@.prompt.j2"       # what the model is given
response = "广告: {{ summary }}"       # what it learns to write (or response_file = "...")

[tokenize]
max_length = 512                       # longer examples: the prompt is cut from the left

[quantization]                         # bitsandbytes
load_in_4bit = true
bnb_4bit_quant_type = "nf4"            # normal float 4: best for pre-trained weights
bnb_4bit_use_double_quant = true       # quantize the constants too: ~0.4 bit/param saved
bnb_4bit_compute_dtype = "bfloat16"    # "auto": bf16 where the GPU has it, else fp16

[lora]                                 # peft
r = 8                                  # rank: higher, more capacity and memory
lora_alpha = 32                        # the update is scaled by lora_alpha / r
lora_dropout = 0.05
target_modules = "auto"                # peft's default for the model, "all-linear", or a list

[train]                                # transformers TrainingArguments names
per_device_train_batch_size = 1        # higher: faster, more memory
gradient_accumulation_steps = 4        # effective batch 4
num_train_epochs = 1
learning_rate = 2e-4
lr_scheduler_type = "cosine"
warmup_ratio = 0.05
optim = "paged_adamw_8bit"             # 8-bit optimizer state, paged out under memory pressure
bf16 = "auto"                          # bf16 mixed precision where the GPU has it
gradient_checkpointing = true          # less memory, ~30% slower
logging_steps = 10
save_steps = 100                       # a killed run resumes from the last checkpoint

[compare]
num_examples = 8                       # held-out rows generated before and after
max_new_tokens = 256
"""

ADGEN_TINY = """\
#:schema @SCHEMA@
# ---------------------------------------------------------------------------------------------
# @NAME@: the whole QLoRA path (NF4 + double quant, LoRA, paged 8-bit AdamW, before/after
# compare) on the embedded tiny GLM model and the synthetic demo data, offline on a CPU in a
# few minutes; started from the `adgen-tiny` recipe. Swap in your data and prompt
# (@NAME@.prompt.j2), and a real model (model.name_or_path) once it works:
#
#     recipe validate @NAME@.toml
#     recipe plan @NAME@.toml
#     recipe run @NAME@.toml
#
# The demo data ships with the runner; write a copy anywhere with
#     python -m runner.data.demo --out data/adgen-demo
# Every key with its type and default: `recipe schema`. Paths are relative to this file.
# ---------------------------------------------------------------------------------------------

[recipe]
name = "@NAME@"                        # names the run directory: runs/@NAME@
seed = 42

[model]
name_or_path = "builtin:tiny-glm"      # built from [model.tiny] once, cached in ~/.cache/recipe

[model.tiny]
corpus = "@DATA@/pretrain.jsonl"       # JSON lines with `text`: trains the tokenizer and the base
hidden_size = 256                      # bigger: better base, slower build
num_layers = 4

[dataset]
path = "@DATA@"                        # a folder: split "train" is train.jsonl, "dev" dev.jsonl
split = "train"
heldout_split = "dev[:32]"             # rows for the before/after comparison

[template]                             # Jinja, sandboxed; a row's columns are its variables
prompt_file = "@NAME@.prompt.j2"       # what the model is given
response = "广告: {{ summary }}"       # what it learns to write (or response_file = "...")

[tokenize]
max_length = 256                       # demo rows are ~100 tokens

[quantization]                         # bitsandbytes, on the CPU too
load_in_4bit = true
bnb_4bit_quant_type = "nf4"
bnb_4bit_use_double_quant = true
bnb_4bit_compute_dtype = "float32"     # CPU: fp32 matmuls are the fast path

[lora]                                 # peft
r = 8
lora_alpha = 32
lora_dropout = 0.0
target_modules = "all-linear"

[train]                                # transformers TrainingArguments names
per_device_train_batch_size = 16
gradient_accumulation_steps = 1
max_steps = 120
learning_rate = 2e-3
warmup_ratio = 0.05
optim = "paged_adamw_8bit"
gradient_checkpointing = false         # tiny activations: recomputing them only costs time
logging_steps = 10
save_steps = 20

[compare]
num_examples = 4
max_new_tokens = 100
"""


def _relative(target: Path, folder: Path) -> str:
    try:
        return Path(os.path.relpath(target, folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return target.as_posix()


def new_recipe(name: str, starter: str, folder: Path) -> list[Path]:
    """Write NAME.toml and NAME.prompt.j2 into `folder`; never overwrite. Returns the paths."""
    stem = name[:-5] if name.endswith(".toml") else name
    if not NAME.match(stem):
        raise RecipeError(
            f"recipe new {name}: a recipe name is letters, digits, '.', '_' and '-', "
            "starting with a letter or digit; e.g. recipe new my-adgen"
        )
    if starter not in STARTERS:
        raise RecipeError(
            f"recipe new --from {starter}: unknown starter; use one of {', '.join(STARTERS)}"
        )
    text = ADGEN if starter == "adgen" else ADGEN_TINY
    data = _relative(DEMO_DATA, folder) if DEMO_DATA.is_dir() else "data/adgen-demo"
    text = (
        text.replace("@SCHEMA@", _relative(SCHEMA_PATH, folder))
        .replace("@NAME@", stem)
        .replace("@DATA@", data)
    )
    files = {folder / f"{stem}.toml": text, folder / f"{stem}.prompt.j2": PROMPT}
    existing = [p for p in files if p.exists()]
    if existing:
        raise RecipeError(
            [
                f"{p}: already exists; recipe new never overwrites: "
                "choose another NAME or --dir, or move it away"
                for p in existing
            ]
        )
    folder.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        with open(path, "x", encoding="utf-8") as f:
            f.write(content)
    return list(files)

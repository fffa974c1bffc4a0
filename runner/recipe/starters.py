"""`recipe new`: commented starter recipes that validate and run as written, self-contained.

`recipe new NAME --from S` writes NAME.toml and a folder NAME/ beside it with everything the
recipe reads: its templates, a copy of the runner's small demo data set (the tiny starters) and
a copy of the JSON schema for the `#:schema` line (editor completion, offline). Every path in
NAME.toml is relative to NAME.toml, so the pair can be moved or committed as it is; `recipe
validate` always checks against the installed runner's own schema, so a stale copy only costs
editor hints. The tiny starters carry the shipped recipes' settings (recipes/adgen-tiny.toml,
chat-tiny.toml, alpaca-tiny.toml; a test keeps them equal), so a starter reuses the tiny model
those built instead of silently building another. Imports no torch.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from runner.errors import RecipeError
from runner.recipe.schema import SCHEMA_PATH

STARTERS = ("adgen", "adgen-tiny", "chat", "alpaca")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# the runner's demo data sets (data/ of the checkout; runner/demo_sets links there, so a wheel
# carries them as package data)
DEMO_SETS = Path(__file__).resolve().parents[1] / "demo_sets"
DEMO_FILES = {
    "adgen-tiny": ("adgen-demo", ("train.jsonl", "dev.jsonl", "pretrain.jsonl")),
    "chat": ("chat-demo", ("train.jsonl", "dev.jsonl")),
    "alpaca": ("alpaca-demo", ("train.jsonl", "dev.jsonl")),
}

# templates/adgen_prompt.j2 and adgen_response.j2 of the shipped recipes (a test keeps them equal)
ADGEN_PROMPT = "用户: {{ content }}\n广告: "
ADGEN_RESPONSE = "{{ summary }}\n"

FOOTER = """\
# Every key with its type and default: `recipe schema` (docs/recipe-reference.md in the runner).
# Paths are relative to this file; @NAME@/ holds what it reads. @NAME@/recipe.schema.json: a
# copy of the runner's schema, for editors (renew: recipe schema > @NAME@/recipe.schema.json)."""

TINY_FOOTER = (
    """\
# @NAME@/data is a copy of the runner's synthetic demo set (@SET@), yours to replace.
"""
    + FOOTER
)

ADGEN = """\
#:schema @NAME@/recipe.schema.json
# ---------------------------------------------------------------------------------------------
# @NAME@: QLoRA fine-tuning, started from the `adgen` recipe (ChatGLM3-6B on AdvertiseGen):
# the base model in 4-bit NF4, LoRA adapters, paged 8-bit AdamW, generations compared before
# and after fine-tuning. Change the model, the data and the templates (@NAME@/*.j2), then:
#
#     recipe validate @NAME@.toml        # schema check: every problem with its line
#     recipe plan @NAME@.toml            # the six stages and what would run
#     recipe run @NAME@.toml             # needs a CUDA GPU with ~8 GB and the network
#     recipe lock @NAME@.toml            # pin model and data commits, library versions;
#     recipe run --locked @NAME@.toml    # then refuse to run when any of them drifts
#
@FOOTER@
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
prompt_file = "@NAME@/prompt.j2"       # what the model is given
response_file = "@NAME@/response.j2"   # what it learns to write (or response = "...", inline)

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
#:schema @NAME@/recipe.schema.json
# ---------------------------------------------------------------------------------------------
# @NAME@: the whole QLoRA path (NF4 + double quant, LoRA, paged 8-bit AdamW, before/after
# compare) on the embedded tiny GLM model and a synthetic AdvertiseGen-shaped demo set, offline
# on a CPU in about 3 minutes; started from the `adgen-tiny` recipe (the same settings, so the
# same cached tiny model). Swap in your data and templates, and a real model
# (model.name_or_path) once it works:
#
#     recipe validate @NAME@.toml
#     recipe plan @NAME@.toml
#     recipe run @NAME@.toml
#
@FOOTER@
# ---------------------------------------------------------------------------------------------

[recipe]
name = "@NAME@"                        # names the run directory: runs/@NAME@
seed = 42

[model]
name_or_path = "builtin:tiny-glm"      # built from [model.tiny] once, cached in ~/.cache/recipe

[model.tiny]
corpus = "@NAME@/data/pretrain.jsonl"  # ad copy without prompts: the base learns the language
hidden_size = 256                      # bigger: better base, slower build (multiple of 64)
num_layers = 4
pretrain_steps = 120                   # ~45 s on 2 cores; more: better base

[dataset]
path = "@NAME@/data"                   # a folder: split "train" is train.jsonl, "dev" dev.jsonl
split = "train"
heldout_split = "dev[:32]"             # rows for the before/after comparison
shuffle = true

[template]                             # Jinja, sandboxed; a row's columns are its variables
prompt_file = "@NAME@/prompt.j2"       # what the model is given
response_file = "@NAME@/response.j2"   # what it learns to write

[tokenize]
max_length = 256                       # demo rows are ~155 tokens

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
per_device_train_batch_size = 8
gradient_accumulation_steps = 1
max_steps = 150
learning_rate = 4e-3                   # tiny model: 2e-3 learns slower, 1e-2 is unstable
lr_scheduler_type = "constant"
optim = "paged_adamw_8bit"
gradient_checkpointing = false         # tiny activations: recomputing them only costs time
logging_steps = 10
save_steps = 25                        # a killed run resumes from the last checkpoint

[compare]
num_examples = 4
max_new_tokens = 120                   # demo summaries are ~110 tokens
"""

CHAT = """\
#:schema @NAME@/recipe.schema.json
# ---------------------------------------------------------------------------------------------
# @NAME@: multi-turn conversations (a `messages` column of {role, content}) fine-tuned with
# QLoRA on the embedded tiny GLM model, offline on a CPU in about 3 minutes; started from the
# `chat-tiny` recipe. Every assistant reply is trained, the rest is masked; the tiny model
# learns its tokenizer and a short pre-training from the training conversations themselves
# (model.tiny.corpus = "train"); compare replays each held-out conversation up to its last
# reply. Swap in your conversations, and a real chat model (model.name_or_path, with
# template.format = "chat_template") once it works:
#
#     recipe validate @NAME@.toml
#     recipe inspect @NAME@.toml         # every turn with its mask
#     recipe run @NAME@.toml
#     recipe chat @NAME@.toml            # talk to the fine-tuned model
#
@FOOTER@
# ---------------------------------------------------------------------------------------------

[recipe]
name = "@NAME@"                        # names the run directory: runs/@NAME@
seed = 42

[model]
name_or_path = "builtin:tiny-glm"      # built from [model.tiny], cached by its settings and data

[model.tiny]
corpus = "train"                       # the tokenizer and pre-training learn the training rows
hidden_size = 256                      # bigger: better base, slower build (multiple of 64)
num_layers = 4
pretrain_steps = 120                   # ~45 s on 2 cores

[dataset]
path = "@NAME@/data"                   # a folder: split "train" is train.jsonl, "dev" dev.jsonl
split = "train"
heldout_split = "dev[:32]"             # held-out conversations for compare
shuffle = true
format = "messages"                    # or "sharegpt" ({from, value} turns); [dataset.messages]
                                       # names another column or other fields

[template]
format = "plain"                       # `user: ...` / `assistant: ...` lines: the tiny model has
                                       # no chat template (a real chat model: "chat_template")
train_turns = "all"                    # every assistant reply ("last": the final one only)
# system = "You are a helpful assistant."   # a system prompt where a conversation has none

[tokenize]
max_length = 256                       # demo rows are ~30-90 tokens

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
per_device_train_batch_size = 8
gradient_accumulation_steps = 1
max_steps = 150
learning_rate = 4e-3                   # tiny model: 2e-3 learns slower, 1e-2 is unstable
lr_scheduler_type = "constant"
optim = "paged_adamw_8bit"
gradient_checkpointing = false         # tiny activations: recomputing them only costs time
logging_steps = 10
save_steps = 25                        # a killed run resumes from the last checkpoint

[compare]
num_examples = 4
max_new_tokens = 40                    # demo replies are ~10-20 tokens
metrics = ["bleu-4", "rouge-l", "chrf"]  # English: scored on words (chrF on characters)
"""

ALPACA = """\
#:schema @NAME@/recipe.schema.json
# ---------------------------------------------------------------------------------------------
# @NAME@: an instruction set (columns instruction, input, output) fine-tuned with QLoRA on the
# embedded tiny GLM model, offline on a CPU in about 3 minutes; started from the `alpaca-tiny`
# recipe. The user turn is the instruction (then the input, when not empty), the output is what
# the model learns to write; the tiny model learns its tokenizer and a short pre-training from
# the training rows themselves (model.tiny.corpus = "train"). Swap in your instructions, and a
# real model (model.name_or_path, with template.format = "chat_template") once it works:
#
#     recipe validate @NAME@.toml
#     recipe inspect @NAME@.toml         # the rendered turns and what is trained
#     recipe run @NAME@.toml
#     recipe generate @NAME@.toml --prompt "What sound does a cow make?"
#
@FOOTER@
# ---------------------------------------------------------------------------------------------

[recipe]
name = "@NAME@"                        # names the run directory: runs/@NAME@
seed = 42

[model]
name_or_path = "builtin:tiny-glm"      # built from [model.tiny], cached by its settings and data

[model.tiny]
corpus = "train"                       # the tokenizer and pre-training learn the training rows
hidden_size = 256                      # bigger: better base, slower build (multiple of 64)
num_layers = 4
pretrain_steps = 120                   # ~45 s on 2 cores

[dataset]
path = "@NAME@/data"                   # a folder: split "train" is train.jsonl, "dev" dev.jsonl
split = "train"
heldout_split = "dev[:32]"             # held-out rows for compare
shuffle = true
format = "alpaca"                      # other column names: [dataset.alpaca]

[template]
format = "plain"                       # `user: ...` / `assistant: ...` lines: the tiny model has
                                       # no chat template (a real chat model: "chat_template")
# system = "You are a helpful assistant."   # a system prompt for every row

[tokenize]
max_length = 256                       # demo rows are ~30-90 tokens

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
per_device_train_batch_size = 8
gradient_accumulation_steps = 1
max_steps = 150
learning_rate = 4e-3                   # tiny model: 2e-3 learns slower, 1e-2 is unstable
lr_scheduler_type = "constant"
optim = "paged_adamw_8bit"
gradient_checkpointing = false         # tiny activations: recomputing them only costs time
logging_steps = 10
save_steps = 25                        # a killed run resumes from the last checkpoint

[compare]
num_examples = 4
max_new_tokens = 40                    # demo replies are ~10-20 tokens
metrics = ["bleu-4", "rouge-l", "chrf"]  # English: scored on words (chrF on characters)
"""


TEXTS = {"adgen": ADGEN, "adgen-tiny": ADGEN_TINY, "chat": CHAT, "alpaca": ALPACA}
SETS = {starter: folder for starter, (folder, _) in DEMO_FILES.items()}


def _sources(starter: str) -> dict[str, Path]:
    """The runner's files a starter copies, by their path under NAME/."""
    sources = {"recipe.schema.json": SCHEMA_PATH}
    if starter in DEMO_FILES:
        folder, names = DEMO_FILES[starter]
        sources.update({f"data/{n}": DEMO_SETS / folder / n for n in names})
    missing = [p for p in sources.values() if not p.is_file()]
    if missing:
        raise RecipeError(
            f"recipe new --from {starter}: the runner's file {missing[0]} is missing; "
            "reinstall the runner"
        )
    return sources


def new_recipe(name: str, starter: str, folder: Path) -> list[Path]:
    """Write NAME.toml and the folder NAME/ (templates, demo data, schema copy) into `folder`;
    never overwrite. Returns the paths written."""
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
    recipe_file, home = folder / f"{stem}.toml", folder / stem
    existing = [p for p in (recipe_file, home) if p.exists() or p.is_symlink()]
    if existing:
        raise RecipeError(
            f"{' and '.join(map(str, existing))}: already "
            f"{'exists' if len(existing) == 1 else 'exist'}; recipe new never overwrites: "
            "choose another NAME or --dir, or move it away"
        )
    sources = _sources(starter)
    footer = (TINY_FOOTER if starter in SETS else FOOTER).replace("@SET@", SETS.get(starter, ""))
    text = TEXTS[starter].replace("@FOOTER@", footer).replace("@NAME@", stem)
    templates = {"prompt.j2": ADGEN_PROMPT, "response.j2": ADGEN_RESPONSE}
    written = [recipe_file]
    home.mkdir(parents=True)
    try:
        for relative, source in sources.items():
            target = home / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            written.append(target)
        if starter.startswith("adgen"):
            for relative, content in templates.items():
                (home / relative).write_bytes(content.encode("utf-8"))  # \n on every system
                written.append(home / relative)
        with open(recipe_file, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
    except BaseException:  # a full disk, ^C: no half-written starter is left behind
        shutil.rmtree(home, ignore_errors=True)
        raise
    return written

"""`recipe plan --model`: the model side of a run from its config alone, no weights read.

The model is built on the meta device from its config.json (for `builtin:tiny-glm` not built
yet, from the recipe's [model.tiny] settings; for a ChatGLM3 checkpoint, from the native GLM
config it converts to), LoRA targets are resolved and checked with the quantize-load stage's own
functions, peft wraps the meta model to count the trainable parameters exactly, and the peak
memory of a training step is estimated part by part:

* weights: the linear layers bitsandbytes quantizes at 4 bits (packed, 2 per byte) plus one
  absmax per 64-weight block (fp32; with double quantization 8 bits, and one fp32 constant per
  256 blocks), or 8 bits plus an fp32 scale per row; every other parameter (embeddings, norms,
  biases, lm_head) in fp32 when peft's upcast applies, else in the compute dtype;
* LoRA parameters (fp32), their gradients, and the optimizer state: AdamW 8 bytes a parameter,
  8-bit AdamW 2 bytes plus a per-256 fp32 absmax pair (tensors under 4,096 elements keep 32-bit
  state), paged buffers (tensors of 100,000 elements or more, on a GPU) in unified memory, which
  the GPU allocator does not count;
* activations, for a LLaMA/GLM-style decoder layer, from the tensors autograd keeps per token
  and layer: the two RMSNorm inputs (fp32); q, k and v as attention sees them (k and v repeated
  to every head when a padding mask keeps sdpa off its grouped-query path; eager attention adds
  the heads x length probabilities); the attention output; the MLP's gate/up output and
  activation; and per LoRA-adapted layer its rank-r A output and its A input: the layer input
  itself, kept once for the layers it feeds (q/k/v share one), or with lora_dropout > 0 the
  dropout output and mask per layer. A frozen 4-bit linear keeps no input (its backward needs
  only the weight); an 8-bit one keeps an fp16 copy. With gradient checkpointing only each
  layer's input is kept, plus one layer recomputed in backward. The loss adds 3 fp32 copies of
  the logits (log-softmax output, its gradient and the gradient it passes on), the largest
  transient of the step: of every token, or with train.chunked_cross_entropy over its one-pass
  size, of one chunk;
* under mixed precision, the half-precision copies autocast makes of fp32 linear weights
  (kept for the forward); the largest de-quantized weight, for the length of one matmul.

Tokens per step come from the tokenize stage's state file (train.length: max for the peak, p50
for a typical step) x per_device_train_batch_size, or tokenize.max_length when it has not run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.data.collate import pad_multiple
from runner.errors import RecipeError
from runner.models import fit
from runner.models.chunked_loss import chunk_tokens, chunking_wanted, head_problem, is_chunked
from runner.models.compile import compile_wanted
from runner.precision import Hardware
from runner.precision import for_recipe as resolve_precision
from runner.recipe import Recipe
from runner.rundir import state_metrics, state_path

GiB = float(2**30)
_PAGED_MIN = 100_000  # bitsandbytes pages state buffers from this many elements on (GPU only)
_STATE8_MIN = 4096  # 8-bit optimizers keep 32-bit state for smaller tensors
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Memory the framework itself takes on the CPU once training runs, beyond the tensors: torch's
# thread pools and kernel scratch, the trainer's data loading: bench/memory.py's figure with the
# tiny model (BENCHMARKS.md, "Measurements behind the code"); it does not grow with the model.
# On a GPU the same lives in host memory, outside the device figure.
_CPU_RUNTIME = 48 * 2**20


@dataclass
class Precision:
    device: str  # "cuda" or "cpu"
    compute: str  # bnb_4bit_compute_dtype resolved: float32 / bfloat16 / float16
    quantized: str  # "4bit", "8bit" or "none"
    upcast: bool  # unquantized layers cast to fp32 (peft's prepare_model_for_kbit_training)
    autocast: str | None  # "bf16" / "fp16" mixed precision in the trainer, or None

    @property
    def compute_bytes(self) -> int:
        return _DTYPE_BYTES[self.compute]

    @property
    def activation_bytes(self) -> int:
        """dtype of the residual stream: fp32 when the upcast embeddings feed it."""
        return 4 if self.quantized != "none" and self.upcast else self.compute_bytes

    @property
    def unquantized_bytes(self) -> int:
        return 4 if self.quantized != "none" and self.upcast else self.compute_bytes


@dataclass
class Tokens:
    batch: int
    peak_length: int
    typical_length: int
    source: str  # where the lengths came from, for the report
    padding_mask: bool  # a padded batch: sdpa runs without its grouped-query path


@dataclass
class Memory:
    weights: int
    weights_detail: str
    lora: int
    gradients: int
    optimizer: int
    optimizer_paged: int  # part of `optimizer` in unified memory (not on the GPU heap)
    autocast_copies: int
    dequant_transient: int
    runtime: int  # the framework's own working memory (CPU only; see _CPU_RUNTIME)
    activations: dict[str, int]  # "checkpointing" / "no_checkpointing" at the peak length

    model: ActivationModel  # prices any layout (runner/models/fit.py)

    def fixed(self, device_heap: bool = False) -> int:
        """Everything but the activations."""
        return (
            self.weights
            + self.lora
            + self.gradients
            + self.optimizer
            + self.autocast_copies
            + self.dequant_transient
            + self.runtime
            - (self.optimizer_paged if device_heap else 0)
        )

    def peak(self, checkpointing: bool, device_heap: bool = False) -> int:
        """At the longest row, every layer checkpointed or none (the loss as the recipe says)."""
        key = "checkpointing" if checkpointing else "no_checkpointing"
        return self.fixed(device_heap) + self.activations[key]

    def step(
        self, tokens: int, length: int, checkpointed: int, chunking: str, device_heap: bool = False
    ) -> int:
        """Peak bytes of a step of `tokens` (rows of `length`) in a layout: the first
        `checkpointed` layers checkpointed, the loss chunked as `chunking` says."""
        return self.fixed(device_heap) + self.model.bytes(tokens, length, checkpointed, chunking)


@dataclass
class ModelPlan:
    model_type: str
    naming: str  # "chatglm" when the checkpoint is ChatGLM3 (converted), else "native"
    config_source: str
    layers: int
    hidden: int
    vocab: int
    targets: list[str]  # native module names
    targets_as_written: list[str]  # in the recipe's naming (ChatGLM3 names for ChatGLM3)
    modules_to_save: list[str] | None
    adapted_modules: int
    trainable: int
    all_params: int
    precision: Precision
    tokens: Tokens
    checkpointing: bool  # some layers checkpointed, in the layout chosen
    optim: str
    memory: Memory
    choice: fit.Choice  # the layout: as the recipe says, or "auto" resolved (models/fit.py)
    notes: list[str] = field(default_factory=list)
    chunkable: bool = True  # the chunked loss can be installed (a plain, frozen output head)

    def as_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# ----------------------------------------------------------------------------- config


class _TinyVocab:
    """What tiny.build_config reads from a tokenizer, before the tokenizer exists."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2  # tiny.SPECIAL_TOKENS

    def __len__(self) -> int:
        return self.size


def model_config(recipe: Recipe) -> tuple[Any, str, str]:
    """(transformers config, naming, where it came from), reading config.json only."""
    from transformers import AutoConfig

    from runner.models import resolve
    from runner.models.chatglm.config import chatglm_config_to_glm

    ident = resolve.model_identity(recipe)
    remote = bool(recipe.get("model.trust_remote_code"))
    if ident["kind"] == "builtin":
        folder = resolve.builtin_folder(ident)
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder), "native", f"{folder}/config.json"
        from runner.models.tiny import build_config

        tiny = recipe.get("model.tiny")
        config = build_config(
            _TinyVocab(tiny["vocab_size"]),  # type: ignore[arg-type]
            hidden_size=tiny["hidden_size"],
            intermediate_size=tiny["intermediate_size"],
            num_layers=tiny["num_layers"],
            num_heads=tiny["num_heads"],
            num_kv_heads=tiny["num_kv_heads"],
            max_position_embeddings=1024,
        )
        return (
            config,
            "native",
            (
                "[model.tiny] settings (not built yet: the vocabulary is "
                f"vocab_size {tiny['vocab_size']}; the trained tokenizer may have fewer)"
            ),
        )
    if ident["kind"] == "local":
        folder = recipe.resolve(recipe.get("model.name_or_path"))
        config_file = folder / "config.json"
    else:
        converted = resolve.converted_folder(ident)
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted), "chatglm", f"{converted}/config.json"
        config_file = _hub_config(recipe, ident)
    where = f"{recipe.origin('model.name_or_path')}: $.model.name_or_path"
    if not config_file.is_file():
        raise RecipeError(
            f"{where}: {config_file.parent} has no config.json; the model plan needs the "
            "model's config.json (copy it into the folder)"
        )
    resolve.check_model_folder(recipe, config_file.parent)
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if resolve.is_chatglm_folder(config_file.parent) and not recipe.get("model.random_init"):
        return chatglm_config_to_glm(raw), "chatglm", f"{config_file} (ChatGLM3, as native GLM)"
    try:
        config = AutoConfig.from_pretrained(config_file.parent, trust_remote_code=remote)
    except (OSError, ValueError, KeyError) as e:  # unknown model_type, bad values
        raise RecipeError(
            f"{where}: {config_file}: transformers cannot use it: "
            f"{(str(e).splitlines() or [type(e).__name__])[0]}; restore the model's original "
            "config.json, or upgrade transformers for a newer model type"
        ) from None
    return config, "native", str(config_file)


def _hub_config(recipe: Recipe, ident: dict[str, Any]) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ident["id"], "config.json", revision=ident["revision"]))
    except Exception as e:  # offline, unknown repo, auth
        raise RecipeError(
            f"{recipe.origin('model.name_or_path')}: $.model.name_or_path: cannot fetch "
            f"config.json of {ident['id']!r} (revision {ident['revision']}): "
            f"{type(e).__name__}; without network, set name_or_path to a local folder holding "
            "its config.json"
        ) from None


def meta_model(recipe: Recipe, config: Any, dtype: Any) -> Any:
    """The model on the meta device: shapes and names, no memory, no weights read."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            trust_remote_code=bool(recipe.get("model.trust_remote_code")),
            attn_implementation=recipe.get("model.attn_implementation"),
        )


# ----------------------------------------------------------------------------- precision, tokens


def precision_for(recipe: Recipe, cuda: bool, bf16_ok: bool) -> Precision:
    q = recipe.section("quantization")
    quantized = "4bit" if q["load_in_4bit"] else "8bit" if q["load_in_8bit"] else "none"
    p = resolve_precision(recipe, Hardware(cuda, bf16_ok))
    return Precision(p.device, p.compute, quantized, p.upcast, p.autocast)


def tokens_for(recipe: Recipe, cuda: bool) -> Tokens:
    """Tokens per training step from the tokenize stage's measured lengths."""
    batch = int(recipe.get("train.per_device_train_batch_size"))
    train = recipe.section("train")
    max_length = int(recipe.get("tokenize.max_length"))
    lengths: dict[str, Any] = {}
    try:
        metrics = state_metrics(state_path(recipe.run_dir, "tokenize"))
        lengths = (metrics.get("train") or {}).get("length") or {}
    except AttributeError:
        lengths = {}
    if lengths.get("max"):
        peak, typical = int(lengths["max"]), int(lengths.get("p50") or lengths["max"])
        source = f"tokenize's measured lengths (p50 {typical}, max {peak})"
    else:
        peak = typical = max_length
        source = f"tokenize has not run: every row assumed tokenize.max_length = {max_length} long"
    if train.get("padding") == "max_length":
        peak = typical = max_length
        source += f"; padded to max_length {max_length}"
    multiple = pad_multiple(recipe, cuda)  # the collator's rounding (train.pad_to_multiple_of)

    def padded(n: int) -> int:
        return multiple * math.ceil(n / multiple)

    if train.get("packing"):  # one row of the batch's examples: batch x mean tokens typically
        mean = float(lengths.get("mean") or typical)
        row = batch * peak
        if lengths.get("mean") and batch > 1:
            # A row is the sum of `batch` random lengths: the mean plus 3 standard deviations of
            # that sum is exceeded by about one row in 700 (the batch-times-longest-example
            # bound overstates it by ~40% on the demo data). Older tokenize states have no std:
            # the p50-p90 spread of a normal distribution stands in for it.
            std = lengths.get("std")
            if std is None:
                std = max(0.0, (float(lengths.get("p90") or mean) - typical) / 1.2816)
            row = min(row, math.ceil(batch * mean + 3 * float(std) * math.sqrt(batch)))
        packed = Tokens(1, padded(row), padded(round(batch * mean)), source, padding_mask=False)
        packed.source += f"; {batch} examples packed per row"
        return packed
    peak, typical = padded(peak), padded(typical)
    return Tokens(batch, peak, typical, source, padding_mask=batch > 1)


# ----------------------------------------------------------------------------- bytes


def quantized_weight_bytes(numel: int, out_features: int, recipe: Recipe, quantized: str) -> int:
    if quantized == "8bit":
        return numel + 4 * out_features  # int8 + an fp32 scale per row
    blocks = math.ceil(numel / 64)
    packed = math.ceil(numel / 2)
    if recipe.get("quantization.bnb_4bit_use_double_quant"):
        return packed + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 64  # + nested code table
    return packed + 4 * blocks + 64  # + the 16-entry code table


def optimizer_bytes(optim: str, numel: int, shape: tuple[int, ...], cuda: bool) -> tuple[int, int]:
    """(state bytes, of which paged) for one fp32 trainable tensor."""
    paged = optim.startswith("paged_") and cuda and numel >= _PAGED_MIN
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        if numel < _STATE8_MIN:
            size = 8 * numel
            paged = False
        else:
            size = 2 * numel + 2 * 4 * math.ceil(numel / 256)
    elif optim == "sgd":
        size, paged = 0, False
    elif optim == "adafactor":
        size = 4 * (shape[0] + shape[1]) if len(shape) == 2 else 4 * numel
        paged = False
    else:  # adamw_torch, adamw_torch_fused, paged_adamw_32bit
        size = 8 * numel
    return size, size if paged else 0


# Which tensor feeds a linear layer of a LLaMA/GLM-style block: layers fed by the same tensor
# share one saved copy of it (an unknown name counts as its own input).
_FED_BY = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "qkv_proj": "attn_in",
    "query_key_value": "attn_in",
    "Wqkv": "attn_in",
    "c_attn": "attn_in",
    "o_proj": "attn_out",
    "dense": "attn_out",
    "out_proj": "attn_out",
    "gate_up_proj": "mlp_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "w1": "mlp_in",
    "w3": "mlp_in",
    "dense_h_to_4h": "mlp_in",
    "fc1": "mlp_in",
    "c_fc": "mlp_in",
    "down_proj": "mlp_mid",
    "w2": "mlp_mid",
    "dense_4h_to_h": "mlp_mid",
    "fc2": "mlp_mid",
}


@dataclass(frozen=True)
class Adapted:
    """A LoRA-adapted linear layer in a decoder block."""

    layer: str  # the block's module path
    leaf: str
    in_features: int
    out_features: int

    @property
    def input_key(self) -> tuple[str, str]:
        return self.layer, _FED_BY.get(self.leaf, self.leaf)


@dataclass(frozen=True)
class ActivationModel:
    """What autograd keeps per token of a step, by part, so that any layout can be priced:
    how many decoder layers are checkpointed, and whether the loss is chunked."""

    layers: int
    per_layer: float  # one decoder layer without checkpointing (average over the layers)
    per_layer_per_length: int  # eager attention's probabilities: x the row length, per token
    ckpt_input: int  # what a checkpointed layer keeps: its input
    outside: int  # the final norm's input and output
    logits: int  # the loss in one pass: fp32 logits, their gradient, the gradient passed on
    layer_backward: int  # the widest gradients while one layer runs backward
    vocab: int
    padding_mask: bool  # a (batch, 1, length, length) bool mask: length bytes per token
    linear_params: int  # frozen weights of one layer's linears (recompute cost: FLOPs / 2)
    head_params: int  # the output head's (the chunked loss recomputes it)

    def bytes(self, tokens: int, length: int, checkpointed: int, chunking: str) -> int:
        """Peak activation bytes of a micro-batch of `tokens` (rows of `length`) with the first
        `checkpointed` layers checkpointed. `chunking`: "off", "threshold" (the chunked loss for
        micro-batches over its one-pass size: train.chunked_cross_entropy = true) or "always"."""
        layer = self.per_layer + self.per_layer_per_length * length
        mask = length if self.padding_mask else 0
        if chunking == "always" or (chunking == "threshold" and is_chunked(tokens, self.vocab)):
            loss = min(tokens, chunk_tokens(self.vocab)) * self.logits
        else:
            loss = tokens * self.logits
        kept = self.layers - checkpointed
        held = tokens * (checkpointed * self.ckpt_input + self.outside + mask)
        forward_end = held + tokens * kept * layer + loss
        # A checkpointed layer recomputes in backward after the kept (later) layers are done.
        recompute = held + tokens * (layer + self.layer_backward) if checkpointed else 0
        return int(max(forward_end, recompute))

    def recompute_params(self, checkpointed: int, chunked: bool) -> int:
        """Frozen weights whose matmuls run again in backward: the step's extra work."""
        return checkpointed * self.linear_params + (self.head_params if chunked else 0)


def activation_model(
    config: Any,
    adapted: list[Adapted],
    eight_bit_inputs: list[int],
    precision: Precision,
    padding_mask: bool,
    attn: str,
    lora_r: int,
    lora_dropout: float,
    use_dora: bool,
    linear_params: int = 0,
    head_params: int = 0,
    compiled: bool = False,
) -> ActivationModel:
    """The activation model of a LLaMA/GLM-style decoder.

    `adapted`: every LoRA-adapted linear in the decoder blocks; `eight_bit_inputs`: in_features
    of every 8-bit linear there. What autograd keeps: a frozen 4-bit (or plain frozen) linear
    keeps no input (its backward needs only the weight); an 8-bit one keeps an fp16 copy; a
    LoRA keeps its A input (the layer's input itself, shared by the layers it feeds, or with
    lora_dropout > 0 the dropout output and mask per layer; a half-precision copy per layer
    under autocast with an fp32 stream) and its rank-r A output.

    `compiled` (train.torch_compile): inductor recomputes elementwise results in backward from
    what they were computed from, so a compiled layer keeps less: the MLP its gate/up output
    (not the activation), and each LoRA dropout a one-byte mask, with its input kept once per
    tensor it reads (the down projection's input, the MLP's product, then counts here). On
    ChatGLM3-6B's shape this matched the measured per-layer figure to 0.2% (BENCHMARKS.md).
    """
    layers = int(config.num_hidden_layers)
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    vocab = int(config.vocab_size)
    a = precision.activation_bytes
    half = 2 if precision.autocast else a  # what autocast'ed matmuls produce
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    norms = 2 * 4 * h  # each RMSNorm keeps its input in fp32
    if attn == "eager" or (padding_mask and attn == "sdpa" and kv_heads != heads):
        qkv = 3 * q_dim * a  # k and v repeated to every head
    else:
        qkv = (q_dim + 2 * kv_dim) * a
    probs = heads * (4 + a) if attn == "eager" else 0  # x the row length
    attn_out = q_dim * a  # kept by the attention kernel's backward
    mlp = 3 * inter * a  # gate/up output (activation and product read it) + the activation
    if compiled:
        mlp = 2 * inter * a  # the activation is recomputed from the gate/up output
        attn_out += heads * 4 if attn == "flex_attention" else 0  # + the log-sum-exp, fp32
    per_layer = norms + qkv + attn_out + mlp
    lora = 0
    shared: dict[tuple[str, str], int] = {}
    for m in adapted:
        lora += lora_r * half + (m.out_features * a if use_dora else 0)
        if compiled and not (precision.autocast and a == 4):
            lora += m.in_features if lora_dropout > 0 else 0  # the dropout mask
            shared[m.input_key] = m.in_features * a  # the input, read again in backward
        elif precision.autocast and a == 4:
            lora += m.in_features * (2 + (1 if lora_dropout > 0 else 0))
        elif lora_dropout > 0:
            lora += m.in_features * (a + 1)  # dropout output + its mask
        else:
            shared[m.input_key] = m.in_features * a
    lora += sum(shared.values()) + sum(2 * fin for fin in eight_bit_inputs)
    return ActivationModel(
        layers=layers,
        per_layer=per_layer + lora / max(layers, 1),
        per_layer_per_length=probs,
        ckpt_input=h * a,
        outside=4 * h + a * h,  # final norm: fp32 input; its output feeds lm_head
        # fp32 log-softmax output, its gradient and the gradient passed on: on an H100 the step
        # measured ~11 bytes a logit in bf16 (BENCHMARKS.md, "auto"), and the half-precision
        # logits do not add to the peak
        logits=vocab * 12,
        layer_backward=(2 * inter + 2 * h) * a,  # gradients of one layer's widest tensors
        vocab=vocab,
        padding_mask=padding_mask,
        linear_params=linear_params,
        head_params=head_params,
    )


# ----------------------------------------------------------------------------- the plan


def plan_model(
    recipe: Recipe,
    *,
    cuda: bool | None = None,
    bf16_ok: bool | None = None,
    tokens: Tokens | None = None,
    budget: tuple[int | None, str] | None = None,
) -> ModelPlan:
    """Everything `recipe plan --model` prints, from the config alone. `cuda`/`bf16_ok` default
    to this machine's hardware; `tokens` to the tokenize stage's measured lengths; `budget`
    (bytes, where it comes from) for the "auto" memory settings to the recipe's
    train.memory_budget_gib (None there: decided on the GPU)."""
    import torch
    from peft import get_peft_model

    from runner.models import load

    if cuda is None or bf16_ok is None:
        cuda, bf16_ok = load.hardware()
    problems = load.precision_problems(recipe, cuda, bf16_ok)
    if problems:
        raise RecipeError(problems)
    precision = precision_for(recipe, cuda, bf16_ok)
    tokens = tokens or tokens_for(recipe, cuda)
    config, naming, source = model_config(recipe)
    dtype = torch.float32 if precision.unquantized_bytes == 4 else getattr(torch, precision.compute)
    model = meta_model(recipe, config, dtype)
    targets = load.resolve_targets(recipe, model, naming)
    modules_to_save = load.resolve_modules_to_save(recipe, model, naming)
    load.check_layers(recipe, model)
    notes: list[str] = []
    if not cuda:
        notes.append(
            "on the CPU, glibc's malloc keeps freed activation memory in its heap: resident memory "
            "can reach about twice the activations; MALLOC_MMAP_THRESHOLD_=131072 in the "
            "environment makes it follow this estimate"
        )
    else:
        notes.append("the CUDA context (about 0.5 GiB) comes on top, outside torch's allocator")
    if not cuda and (problem := load.cpu_4bit_problem(recipe, model)):
        raise RecipeError(problem)

    quantized = {}
    if precision.quantized != "none":
        quantized = {name: (fin, fout) for name, fin, fout in load.quantized_linears(model)}
    q_bytes = other_bytes = q_params = other_params = 0
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            q_params += p.numel()
            q_bytes += quantized_weight_bytes(
                p.numel(), quantized[module][1], recipe, precision.quantized
            )
        else:
            other_params += p.numel()
            other_bytes += p.numel() * p.element_size()
    all_params = q_params + other_params
    fp32_linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n not in quantized and m.weight.dtype == torch.float32
    )
    max_dequant = max((fin * fout for fin, fout in quantized.values()), default=0)

    peft_model = get_peft_model(model, load.lora_config(recipe, targets, modules_to_save))
    lora_bytes = grad_bytes = opt_bytes = opt_paged = lora_fp32 = 0
    optim = recipe.get("train.optim")
    trainable = 0
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        trainable += p.numel()
        size = p.numel() * p.element_size()
        if "lora_" in name or ".modules_to_save." in name:
            lora_bytes += size  # new tensors; a trained bias (lora.bias) is part of the weights
            if p.dtype == torch.float32 and p.dim() == 2:
                lora_fp32 += p.numel()
        grad_bytes += size
        state, paged = optimizer_bytes(optim, p.numel(), tuple(p.shape), cuda)
        opt_bytes += state
        opt_paged += paged
    adapted = []
    for name, m in peft_model.named_modules():
        block, sep, _ = name.partition(".layers.")
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and sep:
            index = name[len(block) + len(sep) :].split(".")[0]
            adapted.append(
                Adapted(
                    f"{block}.layers.{index}",
                    name.rsplit(".", 1)[-1],
                    int(m.base_layer.in_features),
                    int(m.base_layer.out_features),
                )
            )
    eight_bit_inputs = [
        fin
        for n, (fin, _) in quantized.items()
        if ".layers." in n and precision.quantized == "8bit"
    ]
    autocast_copies = (fp32_linear + lora_fp32) * 2 if precision.autocast else 0

    lora_cfg = recipe.section("lora")
    attn = recipe.get("model.attn_implementation")

    linear_params = sum(  # one decoder layer's frozen linears: what recomputing it multiplies
        m.weight.numel()
        for n, m in model.named_modules()
        if ".layers.0." in n and "lora_" not in n and isinstance(m, torch.nn.Linear)
    )
    head = model.get_output_embeddings()
    activation = activation_model(
        config,
        adapted,
        eight_bit_inputs,
        precision,
        tokens.padding_mask,
        attn,
        int(lora_cfg["r"]),
        float(lora_cfg["lora_dropout"]),
        bool(lora_cfg["use_dora"]),
        linear_params=linear_params,
        head_params=int(head.weight.numel()) if head is not None else 0,
        compiled=compile_wanted(recipe, cuda),
    )
    chunking = "threshold" if chunking_wanted(recipe, cuda) else "off"

    def acts(length: int) -> dict[str, int]:
        """Every layer checkpointed and none, the loss as chunked_cross_entropy = true does."""
        n = tokens.batch * length
        return {
            "no_checkpointing": activation.bytes(n, length, 0, chunking),
            "checkpointing": activation.bytes(n, length, activation.layers, chunking),
        }

    qdesc = {
        "4bit": (
            f"4-bit {recipe.get('quantization.bnb_4bit_quant_type')}"
            + (" + double quant" if recipe.get("quantization.bnb_4bit_use_double_quant") else "")
        ),
        "8bit": "8-bit",
        "none": "not quantized",
    }[precision.quantized]
    other_dtype = "fp32" if precision.unquantized_bytes == 4 else precision.compute
    detail = (
        f"{_count(q_params)} params {qdesc}: {_size(q_bytes)}; "
        f"{_count(other_params)} in {other_dtype}: {_size(other_bytes)}"
        if quantized
        else f"{_count(all_params)} params in {other_dtype}"
    )
    memory = Memory(
        weights=q_bytes + other_bytes,
        weights_detail=detail,
        lora=lora_bytes,
        gradients=grad_bytes,
        optimizer=opt_bytes,
        optimizer_paged=opt_paged,
        autocast_copies=autocast_copies,
        dequant_transient=max_dequant * precision.compute_bytes,
        runtime=0 if cuda else _CPU_RUNTIME,
        activations=acts(tokens.peak_length),
        model=activation,
    )
    as_written = recipe.get("lora.target_modules")
    if naming == "chatglm":
        from runner.models.chatglm.names import CHATGLM_TO_GLM_TARGETS

        # ChatGLM3's own names, in its layer order
        written = [c for c, glm in CHATGLM_TO_GLM_TARGETS.items() if set(glm) & set(targets)]
    else:
        written = list(as_written) if isinstance(as_written, list) else targets
    if model.config.model_type not in (
        "glm",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "phi3",
    ):
        notes.append(
            f"activations use the LLaMA/GLM decoder formula; for {model.config.model_type} "
            "they are a rough guide"
        )
    plan = ModelPlan(
        model_type=str(model.config.model_type),
        naming=naming,
        config_source=source,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        vocab=int(config.vocab_size),
        targets=targets,
        targets_as_written=written,
        modules_to_save=modules_to_save,
        adapted_modules=len(adapted),
        trainable=trainable,
        all_params=all_params,
        precision=precision,
        tokens=tokens,
        checkpointing=bool(recipe.get("train.gradient_checkpointing")),
        optim=optim,
        memory=memory,
        choice=None,  # type: ignore[arg-type]  # priced from the plan itself, just below
        notes=notes,
    )
    plan.chunkable = head_problem(model) is None
    plan.choice = fit.choose(plan, recipe, cuda, *(budget or fit.recipe_budget(recipe)))
    plan.checkpointing = plan.choice.layout.checkpointed > 0
    return plan


def plan_for(recipe: Recipe, gpu_memory: float | None = None) -> ModelPlan:
    """`recipe plan --model`'s estimate: for this machine (on a GPU, against its free memory),
    or for a CUDA GPU of `gpu_memory` GiB (train.memory_budget_gib, when set, comes first)."""
    from runner.models.load import hardware

    budget, source = fit.recipe_budget(recipe)
    if gpu_memory is not None:
        if budget is None:
            budget, source = int(gpu_memory * GiB), f"--gpu-memory {gpu_memory:g}"
        return plan_model(recipe, cuda=True, bf16_ok=True, budget=(budget, source))
    cuda, bf16_ok = hardware()
    if cuda:
        return plan_model(recipe, cuda=True, bf16_ok=bf16_ok, budget=fit.gpu_budget(recipe))
    return plan_model(recipe, cuda=False, bf16_ok=bf16_ok)


def _size(n: float) -> str:
    """Bytes as GiB from 1 GiB up, else MiB (KiB under 0.1 MiB)."""
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 0.1 * 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _gib(n: float) -> str:
    """A right-aligned column of sizes."""
    return f"{_size(n):>10}"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def format_model_plan(plan: ModelPlan) -> list[str]:
    """The lines `recipe plan --model` prints."""
    p, m, t = plan.precision, plan.memory, plan.tokens
    kind = (
        "ChatGLM3 checkpoint, trained as native GLM"
        if plan.naming == "chatglm"
        else plan.model_type
    )
    lines = [
        f"model: {kind}: {plan.layers} layers, hidden {plan.hidden}, vocab {plan.vocab}, "
        f"{plan.all_params:,} params (config from {plan.config_source}; no weights read)",
    ]
    if plan.naming == "chatglm":
        lines.append(
            f"LoRA targets: {', '.join(plan.targets_as_written)} (ChatGLM3 names) -> "
            f"{', '.join(plan.targets)}; {plan.adapted_modules} modules adapted"
        )
    else:
        lines.append(
            f"LoRA targets: {', '.join(plan.targets)}; {plan.adapted_modules} modules adapted"
        )
    if plan.modules_to_save:
        lines.append(f"fully trained (modules_to_save): {', '.join(plan.modules_to_save)}")
    lines.append(
        f"trainable params: {plan.trainable:,} of {plan.all_params + plan.trainable:,} "
        f"({100 * plan.trainable / max(plan.all_params + plan.trainable, 1):.4f}%)"
    )
    mixed = f", {p.autocast} mixed precision" if p.autocast else ""
    lines.append(
        f"memory estimate ({p.device}, compute {p.compute}{mixed}, "
        f"unquantized layers in {'fp32' if p.unquantized_bytes == 4 else p.compute}):"
    )
    lines.append(f"  weights          {_gib(m.weights)}  ({m.weights_detail})")
    lines.append(f"  LoRA params      {_gib(m.lora)}")
    lines.append(f"  gradients        {_gib(m.gradients)}")
    paged = (
        f"; {_size(m.optimizer_paged)} of it paged to unified memory" if m.optimizer_paged else ""
    )
    lines.append(f"  optimizer state  {_gib(m.optimizer)}  ({plan.optim}{paged})")
    if m.autocast_copies:
        lines.append(
            f"  autocast copies  {_gib(m.autocast_copies)}  (half-precision copies of fp32 "
            "linear weights, kept during forward)"
        )
    if m.dequant_transient:
        lines.append(
            f"  de-quantized     {_gib(m.dequant_transient)}  "
            "(the largest weight, during one matmul)"
        )
    if m.runtime:
        lines.append(
            f"  runtime          {_gib(m.runtime)}  (torch's thread pools and kernel scratch, data "
            "loading: measured, not model-dependent)"
        )
    shape = f"{t.batch} x {t.peak_length} tokens"
    lines.append(
        f"  activations      {_gib(m.activations['checkpointing'])}  with every layer "
        f"checkpointed; {_size(m.activations['no_checkpointing'])} with none ({shape}; {t.source})"
    )
    layout = plan.choice.layout
    why = plan.choice.describe() if plan.choice.auto else f"{layout.describe()}; as the recipe says"
    lines.append(f"  peak             {_gib(layout.peak + m.optimizer_paged)}  ({why})")
    if t.typical_length != t.peak_length:
        typical = m.step(
            t.batch * t.typical_length, t.typical_length, layout.checkpointed, layout.chunking
        )
        lines.append(
            f"  typical step     {_gib(typical)}  ({t.batch} x {t.typical_length} tokens, "
            "the median length)"
        )
    if m.optimizer_paged:
        lines.append(
            f"  on the GPU heap  {_gib(layout.peak)}  "
            "(torch.cuda.max_memory_allocated counts this; paged state is outside it)"
        )
    lines.extend(f"note: {n}" for n in plan.notes)
    return lines

"""Build the embedded tiny GLM base model from a text corpus.

The project cannot download weights, so the demo trains its own small base:
a byte-level BPE tokenizer plus a ``GlmForCausalLM`` (ChatGLM3-like: partial
rotary 0.5, attention bias, grouped KV heads) pre-trained in fp32 on plain ad
copy (defaults: 120 steps of 16 x 128 tokens, about 45 s on 2 CPU cores). It
knows the language of the corpus but not the content -> summary mapping that
the QLoRA stage then teaches it.

Keep ``intermediate_size`` (and ``hidden_size``) multiples of 64: bitsandbytes'
CPU 4-bit inference path reshapes absmax per row of 64-element blocks and fails
on e.g. 688 once the quantized model is run in eval mode.

torch / transformers / tokenizers are imported inside functions so that the
package imports without them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.state import fresh_tmp_dir, replace_dir

if TYPE_CHECKING:
    import torch
    from transformers import GlmForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Words of the runner's prompt template, seen by the tokenizer trainer (only) so
# that they get proper tokens even though the ad-copy corpus never uses them.
TOKENIZER_EXTRA = ("用户: ", "广告: ")

Log = Callable[[str], None]


def read_corpus(corpus: Path) -> list[str]:
    """Return the non-empty ``text`` fields of a JSONL corpus; a line that is not a JSON object
    with a string ``text`` is a one-line error naming the file and line."""
    from runner.errors import RecipeError

    texts = []
    fix = 'every line must be a JSON object like {"text": "..."}'
    with Path(corpus).open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RecipeError(
                    f"{corpus}:{number}: not UTF-8; convert the corpus to UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(f"{corpus}:{number}: invalid JSON ({e.msg}); {fix}") from None
            if not isinstance(row, dict):
                kind = type(row).__name__.replace("str", "string").replace("NoneType", "null")
                raise RecipeError(f"{corpus}:{number}: a JSON {kind}, not an object; {fix}")
            text = row.get("text", "")
            if not isinstance(text, str):
                raise RecipeError(f'{corpus}:{number}: "text" is not a string; {fix}')
            if text:
                texts.append(text)
    if not texts:
        raise RecipeError(f'{corpus}: no "text" rows; {fix}')
    return texts


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer where every Han character is one token.

    Byte-level means any string round-trips (ASCII, digits, ``#*:``, newlines,
    unseen characters). Isolating Han characters before BPE keeps Chinese at
    character granularity, so an attribute value like ``杏色`` gets the same
    ids in the prompt and in the ad copy, which a tiny model can learn to copy.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, **sizes: int) -> Any:
    """A small ChatGLM3-like ``GlmConfig`` sized by ``sizes``."""
    from transformers import GlmConfig

    heads = sizes["num_heads"]
    return GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=sizes["num_kv_heads"],
        head_dim=sizes["hidden_size"] // heads,
        max_position_embeddings=sizes["max_position_embeddings"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        attention_bias=True,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def init_model(config: Any, seed: int) -> GlmForCausalLM:
    """Randomly initialised model, deterministic for ``seed``."""
    import torch
    from transformers import GenerationConfig, GlmForCausalLM

    torch.manual_seed(seed)
    model = GlmForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


def pack_corpus(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Tokenize each text + eos, concatenate and cut into ``seq_len`` blocks."""
    import torch

    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    seq_len = min(seq_len, len(ids))  # a very small corpus gives one short block
    blocks = len(ids) // seq_len
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


def batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded stream of batches drawn epoch by epoch without replacement."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]
        if len(order) < batch_size:
            yield blocks[order]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    model: GlmForCausalLM,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log: Log,
) -> list[float]:
    """Full-parameter fp32 causal-LM pre-training; returns the per-step losses."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 10)
    stream = batches(blocks, batch_size, seed)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, learning_rate, warmup)
        batch = next(stream)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            log(f"pretrain step {step + 1}/{steps} loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _save_atomically(out_dir: Path, save: Callable[[Path], None]) -> None:
    """Write into a temp sibling, then swap it into place."""
    tmp = fresh_tmp_dir(out_dir)
    save(tmp)
    replace_dir(tmp, out_dir)


def corpus_texts(corpus: Path | None, texts: Sequence[str] | None) -> list[str]:
    """The texts a build trains on: given, or read from the ``corpus`` file."""
    if texts is not None:
        return list(texts)
    if corpus is None:
        raise ValueError("a tiny model build needs a corpus file or texts")
    return read_corpus(corpus)


def build_tiny_tokenizer(
    out_dir: Path,
    *,
    corpus: Path | None = None,
    texts: Sequence[str] | None = None,
    vocab_size: int = 2000,
    max_position_embeddings: int = 1024,
    tokenizer_extra: Sequence[str] = TOKENIZER_EXTRA,
) -> dict[str, Any]:
    """Train the tiny model's tokenizer alone on ``corpus`` (or ``texts``) and save it to
    ``out_dir``: all that format, tokenize and `recipe inspect` need.
    ``build_tiny_model(tokenizer_dir=out_dir)`` then builds the model around these very files,
    so ids never differ between the two."""
    started = time.perf_counter()
    texts = corpus_texts(corpus, texts)
    tokenizer = train_tokenizer([*texts, *tokenizer_extra], vocab_size, max_position_embeddings)

    def save(path: Path) -> None:
        tokenizer.save_pretrained(path)

    _save_atomically(Path(out_dir), save)
    return {
        "vocab_size": len(tokenizer),
        "texts": len(texts),
        "seconds": round(time.perf_counter() - started, 2),
    }


def build_tiny_model(
    out_dir: Path,
    *,
    corpus: Path | None = None,
    texts: Sequence[str] | None = None,
    seed: int = 0,
    vocab_size: int = 2000,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    intermediate_size: int = 704,
    max_position_embeddings: int = 1024,
    pretrain_steps: int = 120,
    pretrain_batch_size: int = 16,
    pretrain_seq_len: int = 128,
    learning_rate: float = 3e-3,
    tokenizer_extra: Sequence[str] = TOKENIZER_EXTRA,
    num_threads: int | None = None,
    tokenizer_dir: Path | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train tokenizer + pre-train a tiny GLM on ``corpus`` (or ``texts``); save to ``out_dir``.

    With ``tokenizer_dir`` (a ``build_tiny_tokenizer`` folder of the same corpus and vocabulary
    size) the model uses that tokenizer and its files are copied as they are, byte for byte.
    Returns facts about the build: parameter count, first/final pretrain
    loss (final = mean of the last 10 steps), vocabulary size and seconds.
    """
    import torch

    say = log or (lambda _msg: None)
    if num_threads:
        torch.set_num_threads(num_threads)
    started = time.perf_counter()
    texts = corpus_texts(corpus, texts)
    if tokenizer_dir is None:
        tokenizer = train_tokenizer([*texts, *tokenizer_extra], vocab_size, max_position_embeddings)
    else:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    say(f"tokenizer: {len(tokenizer)} tokens from {len(texts)} texts")
    config = build_config(
        tokenizer,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
    )
    model = init_model(config, seed)
    params = sum(p.numel() for p in model.parameters())
    say(f"model: GlmForCausalLM, {params:,} parameters")
    blocks = pack_corpus(texts, tokenizer, pretrain_seq_len)
    losses = pretrain(
        model,
        blocks,
        steps=pretrain_steps,
        batch_size=pretrain_batch_size,
        learning_rate=learning_rate,
        seed=seed,
        log=say,
    )

    def save(path: Path) -> None:
        model.save_pretrained(path)
        if tokenizer_dir is None:
            tokenizer.save_pretrained(path)
            return
        import shutil

        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.is_file():
                shutil.copy2(f, path / f.name)

    _save_atomically(Path(out_dir), save)
    seconds = time.perf_counter() - started
    tail = losses[-10:]
    facts: dict[str, Any] = {
        "params": params,
        "vocab_size": len(tokenizer),
        "corpus_tokens": int(blocks.numel()),
        "pretrain_steps": pretrain_steps,
        "initial_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "seconds": round(seconds, 2),
    }
    say(f"built {out_dir} in {seconds:.1f}s: {facts}")
    return facts

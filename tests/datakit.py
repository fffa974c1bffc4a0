"""Helpers for the data-stage tests: recipes, data files and tiny tokenizers written in tmp_path.

The tokenizers are trained in a few hundred milliseconds with the `tokenizers` library and saved
as a local "model" folder (tokenizer files only), which is all format and tokenize need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from runner.models.chatglm.tokenizer import CHATGLM3_SPECIAL_TOKENS
from runner.plan import compute_plan, state_path
from runner.recipe import load_recipe
from runner.rundir import new_state
from runner.state import path_size, write_json_atomic

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHATGLM3 = CHATGLM3_SPECIAL_TOKENS  # appended after the SentencePiece pieces, in id order
IM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    f"question {i} answer {i} hello world Q: A: the quick brown fox {i * 7}" for i in range(40)
]


def make_tokenizer(
    folder: Path | None = None,
    *,
    padding_side: str = "right",
    bos: bool = True,
    pad_is_eos: bool = False,
    chatglm3: bool = False,
    chat_template: str | None = None,
) -> Any:
    """A byte-level BPE tokenizer (any text round-trips); saved to `folder` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = (
        list(CHATGLM3) if chatglm3 else (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    )
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[PAD, BOS, EOS, UNK, *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if chatglm3:  # like ChatGLM3: plain text starts with [gMASK] sop
        tok.post_processor = processors.TemplateProcessing(
            single="[gMASK] sop $A",
            special_tokens=[
                ("[gMASK]", tok.token_to_id("[gMASK]")),
                ("sop", tok.token_to_id("sop")),
            ],
        )
    elif bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS if pad_is_eos else PAD,
        padding_side=padding_side,
        chat_template=chat_template,
    )
    if folder is not None:
        hf.save_pretrained(folder)
    return hf


def tiny_glm(tok: Any, **config: Any) -> Any:
    """A randomly initialised 2-layer GLM (hidden 32) for `tok`, seed 0, in training mode;
    `config` sets attributes of its config (e.g. `_attn_implementation`)."""
    from runner.models.tiny import build_config, init_model

    cfg = build_config(
        tok,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    for key, value in config.items():
        setattr(cfg, key, value)
    return init_model(cfg, seed=0)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def qa_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"q": f"question {i}", "a": f"answer {i}"} for i in range(start, start + n)]


def write_recipe(folder: Path, tokenizer: bool = True, **tables: dict[str, Any]) -> Path:
    """A recipe in `folder` with a local tokenizer folder `tok` as the model (built once per
    folder unless `tokenizer` is false), data in `data/` (train 16 rows, dev 4 rows unless already
    there) and a run dir in `run`; `tables` override or add keys, table by table (None removes)."""
    import tomli_w

    if tokenizer and not (folder / "tok").is_dir():
        make_tokenizer(folder / "tok")
    if not (folder / "data").exists():
        write_jsonl(folder / "data" / "train.jsonl", qa_rows(16))
        write_jsonl(folder / "data" / "dev.jsonl", qa_rows(4, start=100))
    recipe: dict[str, dict[str, Any]] = {
        "recipe": {"name": "data-test", "seed": 1, "output_dir": str(folder / "run")},
        "model": {"name_or_path": "tok"},
        "dataset": {"path": "data", "heldout_split": "dev"},
        "template": {"prompt": "Q: {{ q }}\nA: ", "response": "{{ a }}"},
        "tokenize": {"max_length": 64},
    }
    for name, keys in tables.items():
        table = recipe.setdefault(name, {})
        table.update(keys)
        for key in [k for k, v in table.items() if v is None]:
            del table[key]
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    return path


def mark_done(
    recipe_file: Path, overrides: tuple[str, ...] = (), unsets: tuple[str, ...] = ()
) -> None:
    """Write state files as if every stage had run (outputs faked)."""
    recipe = load_recipe(recipe_file, overrides, unsets=unsets)
    for st in compute_plan(recipe):
        outputs = []
        for rel in st.stage.outputs:
            out = recipe.run_dir / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists():
                out.write_text("x")
            outputs.append({"path": rel, "size": path_size(out)})
        write_json_atomic(
            state_path(recipe.run_dir, st.name),
            new_state(st.name)
            | {
                "status": "done",
                **st.identity(),
                "started": "t",
                "ended": "t",
                "metrics": {},
                "outputs": outputs,
            },
        )


def chatglm_config(**overrides: Any) -> dict[str, Any]:
    """A tiny ChatGLM3-format config.json: 2 layers, multi-query attention with 2 groups."""
    cfg: dict[str, Any] = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": 2,
        "hidden_size": 64,
        "ffn_hidden_size": 128,
        "num_attention_heads": 4,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "kv_channels": 16,
        "padded_vocab_size": 416,
        "seq_length": 256,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "layernorm_epsilon": 1e-5,
        "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "original_rope": True,
        "torch_dtype": "float32",
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cfg.update(overrides)
    return cfg


def session_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The model cache of the whole test session: RECIPE_TEST_CACHE or RECIPE_CACHE when set,
    else one folder under the session's base temp dir, so that each tiny model is built once per
    session (a build of the demo's is about a minute and a half) whichever test needs it first."""
    chosen = os.environ.get("RECIPE_TEST_CACHE") or os.environ.get("RECIPE_CACHE")
    if chosen:
        return chosen
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: one cache for all the workers
        base = base.parent  # (the runner locks a build, so a model is built once)
    cache = base / "recipe-cache"
    cache.mkdir(exist_ok=True)
    return str(cache)


@contextmanager
def run_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of `recipe run`s in and out of this process: a model cache shared by the
    test session (session_cache), one OpenMP thread, no
    fault armed. Yields the environment for subprocesses."""
    cache = session_cache(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECIPE_CACHE", cache)  # for the runs in this process
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.delenv("RECIPE_FAULT", raising=False)
        mp.delenv("RECIPE_FAULT_RANK", raising=False)
        yield dict(os.environ, PYTHONUNBUFFERED="1")


# The demo's tiny model with a shorter pre-training, for the tests that train on
# recipes/adgen-tiny.toml: built in a third of the time, the same shape and tokenizer (its
# quality is the demo's business; the tests check paths, numbers against each other, recovery).
TEST_TINY = ("model.tiny.pretrain_steps=40",)

# `recipe` from this checkout (not whichever is installed), with this interpreter
RECIPE_ARGV = [sys.executable, "-c", "from runner.cli import main; main()"]


def recipe_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`recipe ARGS...` as a real process from the checkout, output captured."""
    return subprocess.run(
        [*RECIPE_ARGV, *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )

"""ChatGLM3 -> native GLM conversion: weights, tokenizer and LoRA adapters.

Everything runs on tiny random models built here (no downloads). The ground truth is
``ChatGLMReference``, an independent forward pass over the original ChatGLM layout.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from chatglm_reference import ChatGLMReference  # noqa: E402
from datakit import chatglm_config  # noqa: E402

from runner.models.chatglm.adapters import (  # noqa: E402
    chatglm_adapter_to_glm,
    convert_adapter,
    convert_adapter_dir,
    glm_adapter_to_chatglm,
)
from runner.models.chatglm.checkpoint import convert_checkpoint, is_chatglm_checkpoint  # noqa: E402
from runner.models.chatglm.config import chatglm_config_to_glm  # noqa: E402
from runner.models.chatglm.names import (  # noqa: E402
    translate_target_modules,
    translate_target_modules_to_chatglm,
)
from runner.models.chatglm.tokenizer import (  # noqa: E402
    CHATGLM3_SPECIAL_TOKENS,
    encode_chatglm3_messages,
    load_chatglm_tokenizer,
)
from runner.models.chatglm.weights import convert_state_dict, glm_state_dict_to_chatglm  # noqa: E402

SP_VOCAB = 400  # tiny SentencePiece model; the ChatGLM3 specials follow at 400..408
PADDED_VOCAB = chatglm_config()["padded_vocab_size"]  # 416
TOL = 1e-5
# Unmerged LoRA forwards in the two layouts sum the same products in a different order (one
# fused rank-3r product vs three rank-r ones), so they agree to float32 rounding only.
LORA_TOL = 1e-4


def random_reference(cfg: dict[str, Any], seed: int = 0) -> ChatGLMReference:
    torch.manual_seed(seed)
    ref = ChatGLMReference(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return ref


def chatglm_state_dict(ref: ChatGLMReference) -> dict[str, Any]:
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    # real checkpoints carry the rotary buffer; the conversion must drop it
    sd["transformer.rotary_pos_emb.inv_freq"] = torch.arange(4, dtype=torch.float32)
    return sd


def glm_model(cfg: dict[str, Any], sd: dict[str, Any], attn: str = "eager") -> Any:
    from transformers import GlmForCausalLM

    config = chatglm_config_to_glm(cfg)
    config._attn_implementation = attn
    model = GlmForCausalLM(config).eval()
    model.load_state_dict(convert_state_dict(sd, cfg), strict=True)
    return model


def input_ids(batch: int = 2, seq: int = 29, seed: int = 1) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PADDED_VOCAB, (batch, seq), generator=g)


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"rope_ratio": 50.0},
        {"multi_query_attention": False},  # per-head interleaved qkv rows
        {"kv_channels": 32, "rope_ratio": 3.0, "multi_query_group_num": 1},
    ],
    ids=["mqa", "rope_ratio", "no_mqa", "one_group"],
)
def test_converted_glm_matches_reference(overrides: dict[str, Any]) -> None:
    cfg = chatglm_config(**overrides)
    ref = random_reference(cfg)
    sd = chatglm_state_dict(ref)
    assert any(k.endswith("query_key_value.bias") and v.abs().min() > 0 for k, v in sd.items())
    ids = input_ids()
    with torch.no_grad():
        expected = ref(ids)
        for attn in ("eager", "sdpa"):
            got = glm_model(cfg, sd, attn)(ids).logits
            assert got.shape == expected.shape
            assert max_diff(got, expected) < TOL, attn


def test_reference_comparison_is_sensitive() -> None:
    """A wrong rope base or a swapped k/v must show up far above the tolerance."""
    cfg = chatglm_config(rope_ratio=50.0)
    ref = random_reference(cfg)
    sd = chatglm_state_dict(ref)
    ids = input_ids()
    with torch.no_grad():
        expected = ref(ids)
        wrong_rope = glm_model(chatglm_config(), sd)(ids).logits
        assert max_diff(wrong_rope, expected) > 1e-3
        model = glm_model(cfg, sd)
        attn = model.model.layers[0].self_attn
        k, v = attn.k_proj.weight.clone(), attn.v_proj.weight.clone()
        attn.k_proj.weight.copy_(v)
        attn.v_proj.weight.copy_(k)
        assert max_diff(model(ids).logits, expected) > 1e-3


def test_config_mapping() -> None:
    cfg = chatglm_config(rope_ratio=500.0)
    config = chatglm_config_to_glm(cfg, eos_token_ids=[2, 406, 408])
    assert config.model_type == "glm"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.vocab_size == PADDED_VOCAB
    assert config.max_position_embeddings == 256
    assert config.attention_bias is True
    assert config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings is False
    assert config.eos_token_id == [2, 406, 408]
    assert config.pad_token_id == 0
    rope = dict(config.rope_parameters or {})
    assert rope["rope_theta"] == pytest.approx(5_000_000.0)
    assert rope["partial_rotary_factor"] == 0.5
    no_mqa = chatglm_config_to_glm(chatglm_config(multi_query_attention=False))
    assert no_mqa.num_key_value_heads == 4
    default_rope = dict(chatglm_config_to_glm(chatglm_config()).rope_parameters or {})
    assert default_rope["rope_theta"] == 10000.0


@pytest.mark.parametrize(
    "bad",
    [{"rmsnorm": False}, {"add_bias_linear": True}, {"position_encoding_2d": True}],
    ids=["layernorm", "linear_bias", "chatglm1"],
)
def test_unsupported_configs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        chatglm_config_to_glm(chatglm_config(**bad))


def test_state_dict_round_trip_and_unknown_keys() -> None:
    cfg = chatglm_config(multi_query_attention=False)
    sd = chatglm_state_dict(random_reference(cfg))
    glm_sd = convert_state_dict(sd, cfg)
    assert "model.layers.1.self_attn.k_proj.bias" in glm_sd
    assert not any("inv_freq" in k for k in glm_sd)
    back = glm_state_dict_to_chatglm(glm_sd, cfg)
    assert set(back) == set(sd) - {"transformer.rotary_pos_emb.inv_freq"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_state_dict({"transformer.prefix_encoder.embedding.weight": torch.zeros(1)}, cfg)


def test_translate_target_modules() -> None:
    assert translate_target_modules(["query_key_value", "dense", "dense_h_to_4h"]) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_up_proj",
    ]
    assert translate_target_modules(["dense_4h_to_h", "q_proj", "query_key_value"]) == [
        "down_proj",
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    assert translate_target_modules("all-linear") == ["all-linear"]
    assert translate_target_modules(["transformer.encoder.layers.3.mlp.dense_4h_to_h"]) == [
        "model.layers.3.mlp.down_proj"
    ]
    assert translate_target_modules_to_chatglm(["q_proj", "v_proj", "o_proj", "down_proj"]) == [
        "query_key_value",
        "dense",
        "dense_4h_to_h",
    ]
    with pytest.raises(ValueError):
        translate_target_modules(r".*\.query_key_value")


# --------------------------------------------------------------------------- tokenizer

CORPUS = """The quick brown fox jumps over the lazy dog.
ChatGLM3 is a bilingual chat model; it answers questions in Chinese and English.
你好，我是人工智能助手。很高兴见到你，欢迎问我任何问题。
晚上睡不着应该怎么办？可以试试听音乐或者读书。
def main():
    print('hello world')\t# greeting
    return 42
Numbers like 2023, 3.14159 and 1,000,000 appear in text.
    Indented    text   with    many     spaces.
Tabs\tand\tnewlines
are whitespace too. Sophisticated sophomores keep a standard operating procedure.
"""


def train_sp(tmp: Path, model_type: str) -> Path:
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    prefix = tmp / f"sp_{model_type}"
    # Like ChatGLM3's tokenizer.model: byte fallback (\n is <0x0A>), identity normalization,
    # no whitespace collapsing, split digits, whitespace-run pieces.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=SP_VOCAB,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["▁▁", "▁▁▁", "▁▁▁▁"],
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sp")
    return {kind: train_sp(tmp, kind) for kind in ("bpe", "unigram")}


@pytest.fixture(scope="module")
def sp_model(sp_models: dict[str, Path]) -> Path:
    return sp_models["bpe"]  # ChatGLM3's tokenizer.model is a BPE model


STANDALONE_SOP = re.compile(r"(?<!\w)(sop|eop)(?!\w)")


def sample_texts() -> list[str]:
    rng = random.Random(0)
    texts = [
        *CORPUS.splitlines(),
        "",
        " ",
        "\n",
        " \n",
        "  x",
        "x  ",
        "a  b   hello\n\n  world",
        "\t   \t     \n \n",
        "emoji 👋🦙 ok",
        "héllo wörld ñ ЗДРАВСТВУЙ",
        "你好",
        "晚上睡不着应该怎么办",
        "12345 678",
        "sophisticated",
    ]
    alphabet = " \n\tabcdefghij你好世界 ,.!123"
    texts += [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))) for _ in range(150)
    ]
    texts += [CORPUS[i : i + rng.randrange(1, 60)] for i in rng.sample(range(len(CORPUS)), 150)]
    return texts


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_segments_like_sentencepiece(sp_models: dict[str, Path], kind: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(sp_models[kind]))
    tok = load_chatglm_tokenizer(sp_models[kind])
    for text in sample_texts():
        if STANDALONE_SOP.search(text):
            continue  # a stand-alone "sop"/"eop" is the special token here, text in sp
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)


def test_tokenizer_special_tokens(sp_model: Path) -> None:
    n = spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size()
    assert n == SP_VOCAB
    tok = load_chatglm_tokenizer(sp_model, model_max_length=256)
    ids = tok.convert_tokens_to_ids(list(CHATGLM3_SPECIAL_TOKENS))
    assert ids == list(range(n, n + 9))  # [MASK]=n ... [gMASK]=n+1, sop=n+3, <|user|>=n+6
    assert len(tok) == n + 9
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 0, None)
    assert tok.model_max_length == 256
    # like ChatGLM3's build_inputs_with_special_tokens
    assert tok("hi").input_ids[:2] == [n + 1, n + 3]
    assert tok("a", "b").input_ids[-1] == 2
    # specials in text are recognised; sop/eop only as whole words
    assert tok.encode("<|user|>", add_special_tokens=False) == [n + 6]
    assert tok.encode("[gMASK]sop<|user|>", add_special_tokens=False) == [n + 1, n + 3, n + 6]
    sophisticated = tok.encode("Sophisticated sophomores", add_special_tokens=False)
    assert not set(sophisticated) & set(ids)
    assert tok.decode(tok("hi there").input_ids, skip_special_tokens=True) == "hi there"


def chat_text(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def chat_ids(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out if isinstance(out, list) else out["input_ids"])


def chatglm3_reference_ids(
    sp: Any, n: int, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    """ChatGLM3's build_single_message / build_chat_input, written against sentencepiece."""
    role_ids = {"system": n + 5, "user": n + 6, "assistant": n + 7, "observation": n + 8}
    ids = [n + 1, n + 3]
    for m in messages:
        ids += [role_ids[m["role"]], *sp.encode("\n"), *sp.encode(m["content"])]
    if add_generation_prompt:
        ids.append(role_ids["assistant"])
    return ids


CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好👋！我是人工智能助手，很高兴见到你。"},
    {"role": "user", "content": "晚上睡不着应该怎么办"},
]


def test_chat_template(sp_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.vocab_size()
    tok = load_chatglm_tokenizer(sp_model)
    text = chat_text(tok, CHAT, add_generation_prompt=True)
    assert text == (
        "[gMASK]sop<|system|>\n You are a helpful assistant.<|user|>\n 你好"
        "<|assistant|>\n 你好👋！我是人工智能助手，很高兴见到你。"
        "<|user|>\n 晚上睡不着应该怎么办<|assistant|>"
    )
    for gen in (True, False):
        expected = chatglm3_reference_ids(sp, n, CHAT, gen)
        assert chat_ids(tok, CHAT, add_generation_prompt=gen) == expected
        assert tok.encode(
            text if gen else text[: -len("<|assistant|>")], add_special_tokens=False
        ) == (expected)
        assert encode_chatglm3_messages(tok, CHAT, add_generation_prompt=gen) == expected
    # tools on a system message and metadata, as ChatGLM3's build_chat_input writes them
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    chat: list[dict[str, Any]] = [
        {"role": "system", "content": "Answer.", "tools": tools},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='x')"},
        {"role": "tool", "content": "sunny"},
    ]
    rendered = chat_text(tok, chat)
    assert rendered.startswith("[gMASK]sop<|system|>\n Answer.\n" + json.dumps(tools, indent=4))
    assert "<|assistant|>get_weather\n tool_call" in rendered
    assert rendered.endswith("<|observation|>\n sunny")
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids == encode_chatglm3_messages(tok, chat)
    # content that contains special-token text stays text with the ChatGLM3-style encoder
    odd = [{"role": "user", "content": "a sop <|user|>"}]
    assert n + 6 not in encode_chatglm3_messages(tok, odd)[3:]


def test_padding_side(sp_model: Path) -> None:
    tok = load_chatglm_tokenizer(sp_model)
    assert tok.padding_side == "left"
    batch = ["hello world, this is longer", "hi"]
    left = tok(batch, padding=True, padding_side="left", return_tensors="pt")
    right = tok(batch, padding=True, padding_side="right", return_tensors="pt")
    assert left.input_ids[1, 0] == 0 and left.attention_mask[1, 0] == 0
    assert right.input_ids[1, -1] == 0 and right.attention_mask[1, -1] == 0
    assert left.attention_mask[1].sum() == right.attention_mask[1].sum()
    assert tok.pad(
        {"input_ids": [[1, 2, 3], [4]]}, padding=True, padding_side="right"
    ).input_ids == [[1, 2, 3], [4, 0, 0]]


def test_tokenizer_rejects_non_sentencepiece(tmp_path: Path) -> None:
    bogus = tmp_path / "tokenizer.model"
    bogus.write_text("IQ== 0\nIg== 1\n")  # GLM-4 style tiktoken file
    with pytest.raises(ValueError, match="SentencePiece"):
        load_chatglm_tokenizer(bogus)


# -------------------------------------------------------------------------- checkpoints


def write_chatglm_checkpoint(
    path: Path, cfg: dict[str, Any], sd: dict[str, Any], sp_model: Path, fmt: str
) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (path / "tokenization_chatglm.py").write_text("raise RuntimeError('remote code ran')\n")
    (path / "modeling_chatglm.py").write_text("raise RuntimeError('remote code ran')\n")
    (path / "MODEL_LICENSE").write_text("license text\n")
    keys = list(sd)
    shards = [
        dict((k, sd[k]) for k in keys[: len(keys) // 2]),
        {k: sd[k] for k in keys[len(keys) // 2 :]},
    ]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        if fmt == "bin":
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(shard, path / name)
        else:
            from safetensors.torch import save_file

            name = f"model-{i:05d}-of-00002.safetensors"
            save_file(shard, str(path / name))
        weight_map.update(dict.fromkeys(shard, name))
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_convert_checkpoint(tmp_path: Path, sp_model: Path, fmt: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig, GlmForCausalLM

    cfg = chatglm_config(rope_ratio=2.0)
    ref = random_reference(cfg, seed=3)
    src = write_chatglm_checkpoint(tmp_path / "src", cfg, chatglm_state_dict(ref), sp_model, fmt)
    assert is_chatglm_checkpoint(src) and is_chatglm_checkpoint(src / "config.json")
    assert not is_chatglm_checkpoint(tmp_path / "nowhere")

    dst = convert_checkpoint(src, tmp_path / "glm", max_shard_size=200_000)
    assert not is_chatglm_checkpoint(dst)
    assert (dst / "model.safetensors.index.json").is_file()  # re-sharded at 200 kB
    assert (dst / "MODEL_LICENSE").is_file()
    assert not list(tmp_path.glob(".glm.*"))  # no temp dirs left behind

    model = GlmForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    ids = input_ids(seed=5)
    with torch.no_grad():
        assert max_diff(model(ids).logits, ref(ids)) < TOL

    n = SP_VOCAB
    gen = GenerationConfig.from_pretrained(dst)
    assert gen.eos_token_id == [2, n + 6, n + 8]  # </s>, <|user|>, <|observation|>
    assert model.config.eos_token_id == [2, n + 6, n + 8]

    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.padding_side == "left" and tok.pad_token_id == 0 and tok.eos_token_id == 2
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    expected = chatglm3_reference_ids(sp, n, CHAT, True)
    assert chat_ids(tok, CHAT, add_generation_prompt=True) == expected
    tok(["a", "bcd"], padding=True, padding_side="right")

    with pytest.raises(FileExistsError):
        convert_checkpoint(src, dst)
    assert convert_checkpoint(src, dst, overwrite=True) == dst


def test_convert_checkpoint_failure_leaves_nothing(tmp_path: Path, sp_model: Path) -> None:
    cfg = chatglm_config()
    sd = chatglm_state_dict(random_reference(cfg))
    sd["transformer.prefix_encoder.embedding.weight"] = torch.zeros(2, 2)
    src = write_chatglm_checkpoint(tmp_path / "src", cfg, sd, sp_model, "safetensors")
    with pytest.raises(ValueError, match="unexpected key"):
        convert_checkpoint(src, tmp_path / "glm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------------------------- LoRA

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
CHATGLM_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def randomize_lora(model: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def merged_chatglm_sd(
    base: dict[str, Any], adapter: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """Apply delta W = scaling * B @ A (per module, scaling from the adapter config)."""
    out = dict(base)
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model.") : -len(".lora_A.weight")]
        b = adapter[key.replace("lora_A", "lora_B")]
        rank = a.shape[0]
        leaf = module.rpartition(".")[2]
        alpha = config["alpha_pattern"].get(
            leaf, config["alpha_pattern"].get(module, config["lora_alpha"])
        )
        assert (
            config["rank_pattern"].get(leaf, config["rank_pattern"].get(module, config["r"]))
            == rank
        )
        scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        out[module + ".weight"] = base[module + ".weight"] + scale * (b @ a)
    return out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_glm_lora_exports_to_chatglm(tmp_path: Path, use_rslora: bool) -> None:
    from peft import (
        LoraConfig,
        PeftModel,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )

    cfg = chatglm_config()
    ref = random_reference(cfg)
    base_sd = chatglm_state_dict(ref)
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, use_rslora=use_rslora)
    glm = get_peft_model(glm_model(cfg, base_sd), lora_cfg)
    randomize_lora(glm, seed=7)
    glm_adapter = get_peft_model_state_dict(glm)

    res = convert_adapter(glm_adapter, lora_cfg, to="chatglm")
    sd, targets = glm_adapter_to_chatglm(glm_adapter, lora_cfg)
    assert sorted(targets) == sorted(CHATGLM_TARGETS) == sorted(res.target_modules)
    assert sd.keys() == res.state_dict.keys()
    qkv_a = (
        "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight"
    )
    assert sd[qkv_a].shape == (12, 64)  # q/k/v A differ: stacked, B block-diagonal
    assert res.config["rank_pattern"] == {"query_key_value": 12}
    assert res.config["alpha_pattern"] == {
        "query_key_value": pytest.approx(8 * (3**0.5 if use_rslora else 3))
    }

    ids = input_ids(seed=11)
    with torch.no_grad():
        unmerged = glm(ids).logits
    # the exported adapter loads into peft on the ChatGLM-layout model with its config
    chat = get_peft_model(reference_with(cfg, base_sd), LoraConfig(**_lora_kwargs(res.config)))
    loaded_keys: Any = set_peft_model_state_dict(chat, sd)
    assert not loaded_keys.unexpected_keys
    with torch.no_grad():
        assert max_diff(chat(ids), unmerged) < LORA_TOL
    # merged weights give the same logits
    ref.load_chatglm_state_dict(merged_chatglm_sd(base_sd, sd, res.config))
    with torch.no_grad():
        assert max_diff(ref(ids), glm_merged(glm, ids)) < TOL

    # the same through adapter directories (adapter_config.json carries the patterns)
    glm.save_pretrained(str(tmp_path / "glm_adapter"))
    out = convert_adapter_dir(tmp_path / "glm_adapter", tmp_path / "chatglm_adapter", to="chatglm")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"query_key_value": 12}
    assert sorted(saved["target_modules"]) == sorted(CHATGLM_TARGETS)
    loaded = PeftModel.from_pretrained(reference_with(cfg, base_sd), out)
    with torch.no_grad():
        assert max_diff(loaded(ids), unmerged) < LORA_TOL

    # and back: the original q/k/v LoRAs, bit for bit, with the original ranks
    back = convert_adapter(sd, res.config, to="glm", model_config=cfg)
    assert back.state_dict.keys() == glm_adapter.keys()
    assert all(torch.equal(back.state_dict[k], glm_adapter[k]) for k in glm_adapter)
    assert back.config["rank_pattern"] == {} and back.config["alpha_pattern"] == {}
    assert sorted(back.target_modules) == sorted(LORA_TARGETS)


def reference_with(cfg: dict[str, Any], sd: dict[str, Any]) -> ChatGLMReference:
    return ChatGLMReference.from_state_dict(cfg, sd)


def glm_merged(peft_model: Any, ids: Any) -> Any:
    """Logits after merging the LoRA into the weights (on a copy of the model)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(peft_model).merge_and_unload()(ids).logits


def _lora_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")
    return {k: config[k] for k in keys}


def test_fused_chatglm_lora_imports_to_glm() -> None:
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )

    cfg = chatglm_config()
    ref = random_reference(cfg)
    base_sd = chatglm_state_dict(ref)
    chat_cfg = LoraConfig(r=4, lora_alpha=16, target_modules=CHATGLM_TARGETS)
    chat = get_peft_model(reference_with(cfg, base_sd), chat_cfg)
    randomize_lora(chat, seed=3)
    chat_adapter = get_peft_model_state_dict(chat)

    sd, targets = chatglm_adapter_to_glm(chat_adapter, chat_cfg, model_config=cfg)
    assert sorted(targets) == sorted(LORA_TARGETS)
    res = convert_adapter(chat_adapter, chat_cfg, to="glm", model_config=cfg)
    assert res.config["rank_pattern"] == {} and res.config["alpha_pattern"] == {}
    # A is shared by q, k and v; B is split by rows
    a0 = "base_model.model.model.layers.0.self_attn.{}_proj.lora_A.weight"
    assert torch.equal(sd[a0.format("q")], sd[a0.format("v")])

    glm = get_peft_model(glm_model(cfg, base_sd), LoraConfig(**_lora_kwargs(res.config)))
    loaded_keys: Any = set_peft_model_state_dict(glm, sd)
    assert not loaded_keys.unexpected_keys
    ids = input_ids(seed=13)
    ref.load_chatglm_state_dict(merged_chatglm_sd(base_sd, chat_adapter, res.config))
    with torch.no_grad():
        assert max_diff(glm(ids).logits, chat(ids)) < LORA_TOL  # both unmerged
        assert max_diff(glm_merged(glm, ids), ref(ids)) < TOL  # both merged

    # shared A -> one fused LoRA again, tensors unchanged
    again, _ = glm_adapter_to_chatglm(sd, res.config)
    assert again.keys() == chat_adapter.keys()
    assert all(torch.equal(again[k], chat_adapter[k]) for k in chat_adapter)


def test_partial_qkv_lora_and_patterns() -> None:
    """Only q and v adapted, with a per-module alpha: the fused delta keeps k untouched."""
    cfg = chatglm_config()
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"
    adapter = {}
    for layer in range(2):
        for part, rows in (("q", 64), ("v", 32)):
            adapter[prefix.format(layer, part, "A")] = torch.randn(2, 64, generator=g)
            adapter[prefix.format(layer, part, "B")] = torch.randn(rows, 2, generator=g)
    config = {
        "r": 2,
        "lora_alpha": 4,
        "alpha_pattern": {"v_proj": 8},
        "target_modules": ["q_proj", "v_proj"],
    }
    res = convert_adapter(adapter, config, to="chatglm", model_config=cfg)
    key = "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_{}"
    key += ".weight"
    a, b = res.state_dict[key.format("A")], res.state_dict[key.format("B")]
    assert res.config["rank_pattern"] == {"query_key_value": 4}
    scale = res.config["alpha_pattern"]["query_key_value"] / 4
    delta = scale * (b @ a)
    q_delta = 2.0 * adapter[prefix.format(1, "q", "B")] @ adapter[prefix.format(1, "q", "A")]
    v_delta = 4.0 * adapter[prefix.format(1, "v", "B")] @ adapter[prefix.format(1, "v", "A")]
    assert max_diff(delta[:64], q_delta) < 1e-6
    assert float(delta[64:96].abs().max()) == 0.0
    assert max_diff(delta[96:], v_delta) < 1e-6

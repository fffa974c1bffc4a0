"""ChatGLM3's tokenizer without its remote code: a fast tokenizer built from the SentencePiece
``tokenizer.model``, and conversations encoded as ChatGLM3's ``build_chat_input`` encodes them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: Special tokens ChatGLM3 appends after the SentencePiece vocabulary, in id order.
CHATGLM3_SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)

#: ChatGLM3's prompt format: ``[gMASK]sop`` then, per message, ``<|role|>{metadata}\n {content}``;
#: the generation prompt is a bare ``<|assistant|>`` (the model writes the ``\n`` itself).
#: Equivalent to the template THUDM published in chatglm3-6b's tokenizer_config.json, plus the
#: optional ``metadata`` field and ``tools`` on a system message that ChatGLM3's
#: ``build_chat_input`` supports, and the ``tool`` role as an alias of ``observation``.
CHATGLM3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}[gMASK]sop{%- endif -%}"
    "{%- set role = 'observation' if message['role'] == 'tool' else message['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{ raise_exception('ChatGLM3 has no role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- set content = message['content'] -%}"
    "{%- if role == 'system' and message.get('tools') -%}"
    "{%- set content = content ~ '\n' ~ (message['tools'] | tojson(indent=4)) -%}"
    "{%- endif -%}"
    "<|{{ role }}|>{{ message.get('metadata') or '' }}\n {{ content }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# SentencePiece ModelProto.SentencePiece.Type values.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _read_sp_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2

        model_pb2: Any = sentencepiece_model_pb2
    except ImportError:  # pragma: no cover - see docs/compatibility.md
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    data = path.read_bytes()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(
            f"{path} is not a SentencePiece model (GLM-4's tiktoken tokenizer is not supported)"
        ) from exc
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def _unigram_model(pieces: list[Any], trainer: Any) -> Any:
    from tokenizers.models import Unigram

    normal = [float(p.score) for p in pieces if p.type == _SP_NORMAL]
    # Pieces SentencePiece never puts in the lattice (control, unused, byte, unk) get a score
    # that loses every comparison; user-defined pieces get SentencePiece's bonus,
    # length * max_score - 0.1, where its max_score starts from FLT_MIN (the smallest positive
    # float), so with the usual negative scores the bonus is about -0.1.
    max_score = max([1.17549435e-38, *normal])
    never = min(normal, default=0.0) - 1000.0

    def lattice_score(p: Any) -> float:
        if p.type == _SP_NORMAL:
            return float(p.score)
        if p.type == _SP_USER_DEFINED:
            return len(p.piece) * max_score - 0.1
        return never

    vocab = [(p.piece, lattice_score(p)) for p in pieces]
    return Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)


def _bpe_model(pieces: list[Any], trainer: Any, *, has_user_defined: bool) -> Any:
    from tokenizers.models import BPE

    normal = {p.piece: (float(p.score), i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
    # SentencePiece repeatedly merges the adjacent pair whose concatenation is the best-scoring
    # piece; as merge rules: every split of every normal piece, ranked by the piece's score.
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, (score, pid) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, pid, cut, left, right))
    ranked.sort()
    return BPE(
        vocab={p.piece: i for i, p in enumerate(pieces)},
        merges=[(left, right) for *_, left, right in ranked],
        unk_token=pieces[trainer.unk_id].piece,
        fuse_unk=True,
        byte_fallback=trainer.byte_fallback,
        # user-defined pieces are isolated by the pre-tokenizer and must come out whole
        ignore_merges=has_user_defined,
    )


def _sp_to_tokenizers(proto: Any) -> Any:
    """Build a ``tokenizers.Tokenizer`` that segments like ``SentencePieceProcessor.encode``.

    Follows the model's own normalizer spec and piece types: the dummy prefix is prepended
    to every chunk of text between special tokens (as each ``sp.encode`` call does in
    ChatGLM3's ``build_single_message``), byte fallback, BPE merges ranked by piece score,
    user-defined pieces kept whole.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("SentencePiece models with treat_whitespace_as_suffix are not supported")
    pieces = list(proto.pieces)
    user_defined = [p.piece for p in pieces if p.type == _SP_USER_DEFINED]

    if trainer.model_type == 1:
        model = _unigram_model(pieces, trainer)
    elif trainer.model_type == 2:
        model = _bpe_model(pieces, trainer, has_user_defined=bool(user_defined))
    else:
        raise ValueError(
            f"unsupported SentencePiece model_type {trainer.model_type} (need BPE/Unigram)"
        )

    tok = Tokenizer(model)
    space = "▁" if norm.escape_whitespaces else " "
    steps: list[Any] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    if user_defined and trainer.model_type == 2:
        # SentencePiece's BPE matches user-defined pieces greedily (longest first) and never
        # merges them with their neighbours: isolate them before the model sees the text.
        alternatives = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(alternatives), behavior="isolated")
    dec: list[Any] = [decoders.Replace(space, " ")] if space != " " else []
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def load_chatglm_tokenizer(
    tokenizer_model: str | os.PathLike[str],
    *,
    model_max_length: int | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> PreTrainedTokenizerFast:
    """A fast tokenizer equivalent to ChatGLM3's, built from its SentencePiece ``tokenizer.model``.

    * ids ``0..n-1`` are the SentencePiece pieces and segment text like ``sp.encode``; the nine
      :data:`CHATGLM3_SPECIAL_TOKENS` follow at ``n..n+8`` (64789.. for the real model).
    * ``eos_token="</s>"`` (2), ``pad_token="<unk>"`` (0, as ChatGLM3), ``unk_token="<unk>"``,
      no bos; ``padding_side`` defaults to ChatGLM3's ``"left"`` and per-call
      ``padding_side=`` works.
    * ``add_special_tokens=True`` prefixes ``[gMASK] sop`` (pairs: ``[gMASK] sop A B </s>``),
      like ChatGLM3's ``build_inputs_with_special_tokens``. The chat template writes
      ``[gMASK]sop`` itself, so tokenize rendered chats with ``add_special_tokens=False``
      (``apply_chat_template(tokenize=True)`` does).
    * Special tokens written in text are recognised. ``sop``/``eop`` are plain words, so they
      only match as whole words (``single_word``): ``sophisticated`` is ordinary text, a
      stand-alone ``sop`` is not.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_model)
    proto = _read_sp_proto(path)
    tok = _sp_to_tokenizers(proto)
    n = len(proto.pieces)
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    for name in ("<unk>", "</s>"):
        if name not in pieces:
            raise ValueError(f"{path}: SentencePiece vocab has no {name!r} piece")
    # Control / unknown pieces that exist in the vocab (<unk>, <s>, </s>): special tokens.
    existing = [
        AddedToken(p.piece, special=True, normalized=False)
        for p in proto.pieces
        if p.type in (_SP_CONTROL, _SP_UNKNOWN)
    ]
    tok.add_special_tokens(existing)
    added = [
        AddedToken(t, special=True, normalized=False, single_word=t in ("sop", "eop"))
        for t in CHATGLM3_SPECIAL_TOKENS
    ]
    tok.add_special_tokens(added)
    for offset, t in enumerate(CHATGLM3_SPECIAL_TOKENS):
        if tok.token_to_id(t) != n + offset:
            raise ValueError(
                f"{t!r} got id {tok.token_to_id(t)}, expected {n + offset}: the SentencePiece "
                "vocab already contains a ChatGLM3 special token"
            )
    gmask, sop, eos = n + 1, n + 3, pieces["</s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A",
        pair="[gMASK] sop $A $B </s>",
        special_tokens=[("[gMASK]", gmask), ("sop", sop), ("</s>", eos)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="</s>",
        pad_token="<unk>",
        padding_side=padding_side,
        chat_template=CHATGLM3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
    )
    return hf


_CHATGLM3_ROLES = ("system", "user", "assistant", "observation")


def encode_chatglm3_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of a conversation built the way ChatGLM3's ``build_chat_input`` builds them.

    ``[gMASK] sop``, then per message the role token, ``"{metadata}\n"`` and the content,
    each encoded as plain text. Unlike tokenizing the rendered chat template, special-token
    strings inside message text (``<|user|>``, a stand-alone ``sop``) stay ordinary text.
    For ordinary content the ids equal ``apply_chat_template(messages, tokenize=True)``.
    """
    ids = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])
    for message in messages:
        role = "observation" if message["role"] == "tool" else message["role"]
        if role not in _CHATGLM3_ROLES:
            raise ValueError(f"ChatGLM3 has no role {message['role']!r}")
        content = message["content"]
        if role == "system" and message.get("tools"):
            content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids.append(tokenizer.convert_tokens_to_ids(f"<|{role}|>"))
        for text in (f"{message.get('metadata') or ''}\n", content):
            ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if add_generation_prompt:
        ids.append(tokenizer.convert_tokens_to_ids("<|assistant|>"))
    return [int(i) for i in ids]

"""How a rendered (prompt, response) pair becomes token ids, per `template.format`.

- plain: the prompt with the tokenizer's own special tokens (bos, or ChatGLM3's `[gMASK]sop`),
  then the response, then the eos token.
- chat_template: `tokenizer.apply_chat_template` with the prompt as the user message and the
  response as the assistant message; the response part is what the full conversation adds to
  the prompt rendered with the generation prompt (so the assistant header is masked and the
  template's end-of-turn token is trained). The eos token is appended when the template's
  assistant turn does not contain it.
- chatglm3: `[gMASK]sop<|user|>\\n {prompt}<|assistant|>\\n {response}</s>` built by
  `runner.models.chatglm.tokenizer.encode_chatglm3_messages`, as ChatGLM3's own fine-tuning does:
  the role tokens are masked, the newline after `<|assistant|>`, the reply and `</s>` are trained.

In every format `encode` returns (prompt ids, response ids) where the response ids end with the
end token; the tokenize stage masks the prompt and truncates. No torch here.

A conversation (dataset.format = messages / sharegpt / alpaca, see runner/data/conversations.py)
goes through `conversation`: ids and a trained flag per token, turn by turn. chat_template: each
assistant turn is what rendering it adds to the turns before it rendered with the generation
prompt (so its header is masked and its end-of-turn text trained); chatglm3: ChatGLM3's role
tokens, each trained reply with the role token (or `</s>`) after it, as ChatGLM3's fine-tuning
trains it; plain: `role: text` lines (`user: ...\nassistant: `) masked, each reply and an eos
trained. The boundaries come from rendering prefixes, never from searching the text; a template
that renders earlier turns differently once later turns follow is refused.

Text is text: a special-token string (`</s>`, `<|im_end|>`, `<|user|>`) that comes from the data
is encoded as ordinary text in every format; only the format (bos, the chat template's headers,
ChatGLM3's role tokens) and the recipe's own template text add control tokens. For plain, a
special-token string counts as the template's when that part's template (prompt or response)
contains it (the same string in that part's data then is a token too: the lint names such rows);
for chat_template, the message contents are data. Rows without such strings encode exactly as
the tokenizer encodes the whole text. The fast tokenizer's `encode_special_tokens` switch is set per
call and restored, so the ids never depend on what the tokenizer encoded before.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from runner.errors import RecipeError

FORMATS = ("plain", "chat_template", "chatglm3")
CHATGLM3_TOKENS = ("[gMASK]", "sop", "<|user|>", "<|assistant|>")


class Encoder:
    """Token ids of prompts and responses for one tokenizer and one format."""

    def __init__(
        self,
        tok: Any,
        fmt: str,
        where: str = "template.format",
        literal: Mapping[str, str] | None = None,
        turns: bool = False,
        system: str | None = None,
    ) -> None:
        """`turns`: the recipe trains on conversations (dataset.format), so a text prompt is
        the user's turn of a new conversation (after `system`, template.system)."""
        self.turns, self.system = turns, system
        if fmt not in FORMATS:
            raise RecipeError(f"{where}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        if tok.eos_token_id is None:
            raise RecipeError(
                f"{where}: the tokenizer has no eos token; the model could never learn to stop"
            )
        self.tok = tok
        self.fmt = fmt
        self.eos = int(tok.eos_token_id)
        if fmt == "chat_template" and not getattr(tok, "chat_template", None):
            raise RecipeError(
                f'{where}: format "chat_template" but the tokenizer has no chat '
                'template; use format = "plain" (or "chatglm3" for ChatGLM3)'
            )
        if fmt == "chatglm3":
            unk = tok.unk_token_id
            missing = [
                t
                for t in CHATGLM3_TOKENS
                if tok.convert_tokens_to_ids(t) in (None, unk) and t not in tok.get_vocab()
            ]
            if missing:
                raise RecipeError(
                    f'{where}: format "chatglm3" but the tokenizer has no '
                    f"{', '.join(missing)} token; use it with a ChatGLM3 tokenizer, "
                    'or format = "plain"'
                )
        added = getattr(tok, "added_tokens_decoder", {})
        self.special = set(tok.all_special_ids) | {i for i, t in added.items() if t.special}
        strings = {str(t) for t in tok.all_special_tokens} | {
            str(t.content) for t in added.values() if t.special
        }
        strings = {t for t in strings if t}
        sources = dict(literal or {})
        if fmt == "chat_template":  # its own headers, where a content could not be found
            sources = {k: v + str(tok.chat_template) for k, v in sources.items()}
            sources.setdefault("", str(tok.chat_template))
        # per part: a `</s>` the prompt template writes says nothing about the response's data
        self.kept = {part: {t for t in strings if t in text} for part, text in sources.items()}
        self.kept_default = self.kept.get("", set())
        # longest first: `<|im_end|>` before a `<|` some other token might start with
        alternatives = sorted(strings, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, alternatives))) if strings else None
        self._affixes: tuple[list[int], list[int]] | None = None

    def data_specials(
        self, text: str, spans: list[tuple[int, int]] | None = None, part: str = ""
    ) -> list[tuple[int, int]]:
        """Where special-token strings from the data are in `text`: inside `spans` (the data's
        ranges), or with spans None, every one the recipe's template for `part` does not
        contain."""
        kept = self.kept.get(part, self.kept_default)
        if self.pattern is None:
            return []
        found = []
        for m in self.pattern.finditer(text):
            if spans is None:
                if m.group() not in kept:
                    found.append(m.span())
            elif any(lo <= m.start() and m.end() <= hi for lo, hi in spans):
                found.append(m.span())
        return found

    def ids(
        self,
        texts: list[str],
        add_special_tokens: bool,
        spans: list[list[tuple[int, int]] | None] | None = None,
        part: str = "",
    ) -> list[list[int]]:
        """Token ids of texts whose special-token strings from the data stay text (see the
        module docstring); `spans`: per text, the ranges that are data (None: see
        `data_specials`)."""
        per_text = spans if spans is not None else [None] * len(texts)
        cuts = [self.data_specials(t, s, part) for t, s in zip(texts, per_text, strict=True)]
        plain = [i for i, c in enumerate(cuts) if not c]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            encoded = self._batch([texts[i] for i in plain], add_special_tokens, split=False)
            for i, ids in zip(plain, encoded, strict=True):
                out[i] = ids
        for i, c in enumerate(cuts):
            if c:
                out[i] = self._with_text_specials(texts[i], c, add_special_tokens)
        return out

    def _with_text_specials(
        self, text: str, cuts: list[tuple[int, int]], add_special_tokens: bool
    ) -> list[int]:
        """The text in pieces: between the cuts as the tokenizer reads it, the cuts (special-
        token strings from the data) as text; the format's own special tokens around it all."""
        ids: list[int] = []
        start = 0
        for lo, hi in cuts:
            if text[start:lo]:
                ids += self._batch([text[start:lo]], False, split=False)[0]
            ids += self._batch([text[lo:hi]], False, split=True)[0]
            start = hi
        if text[start:]:
            ids += self._batch([text[start:]], False, split=False)[0]
        if not add_special_tokens:
            return ids
        prefix, suffix = self.affixes()
        return [*prefix, *ids, *suffix]

    def affixes(self) -> tuple[list[int], list[int]]:
        """What add_special_tokens puts before and after a text (bos, `[gMASK]sop`, an eos)."""
        if self._affixes is None:
            bare = self._batch(["a"], False, split=False)[0]
            full = self._batch(["a"], True, split=False)[0]
            at = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), len(full))
            self._affixes = (full[:at], full[at + len(bare) :])
        return self._affixes

    def _batch(self, texts: list[str], add_special_tokens: bool, split: bool) -> list[list[int]]:
        """`tok(texts)["input_ids"]`; straight from a fast tokenizer's backend when it truncates
        and pads nothing: the same ids without offsets, attention masks and a Python object per
        row (about a quarter less CPU on the demo data). `split`: special-token strings in the
        texts are encoded as text."""
        backend = getattr(self.tok, "_tokenizer", None)
        if (
            getattr(self.tok, "is_fast", False)
            and backend is not None
            and backend.truncation is None
            and backend.padding is None
        ):
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets
            with special_splitting(self.tok, split):
                encodings = encode(texts, add_special_tokens=add_special_tokens)
            return [e.ids for e in encodings]
        with special_splitting(self.tok, split):
            return list(
                self.tok(texts, add_special_tokens=add_special_tokens, split_special_tokens=split)[
                    "input_ids"
                ]
            )

    def prefix_length(self, prompt_ids: list[int]) -> int:
        """Leading special tokens (bos, `[gMASK]sop`, a chat header) that truncation keeps."""
        n = 0
        while n < len(prompt_ids) and n < 8 and prompt_ids[n] in self.special:
            n += 1
        return n

    def encode(
        self, prompts: list[str], responses: list[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        if self.fmt == "plain":
            p = self.ids(prompts, add_special_tokens=True, part="prompt")
            r = self.ids(responses, add_special_tokens=False, part="response")
            return p, [[*ids, self.eos] for ids in r]
        if self.fmt == "chat_template":
            return self._chat_template(prompts, responses)
        return self._chatglm3(prompts, responses)

    def prompt_ids(self, prompts: Sequence[str | Conversation]) -> list[list[int]]:
        """What generation starts from: the prompt as the format presents it to the model; a
        conversation (a list of messages ending with a user turn) as `conversation_prompt_ids`;
        with `turns`, a text is the user's turn of a new conversation. Without, texts and
        conversations may come mixed (a [[dataset.sources]] mix of both): each as it trained."""
        if self.turns:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return [
                self.conversation_prompt_ids([*system, _user(p)] if isinstance(p, str) else p)
                for p in prompts
            ]
        if any(not isinstance(p, str) for p in prompts):
            at = [i for i, p in enumerate(prompts) if isinstance(p, str)]
            text_ids = iter(self.prompt_ids([str(prompts[i]) for i in at]) if at else [])
            return [
                next(text_ids) if isinstance(p, str) else self.conversation_prompt_ids(p)
                for p in prompts
            ]
        texts = [str(p) for p in prompts]
        if self.fmt == "plain":
            return self.ids(texts, add_special_tokens=True, part="prompt")
        if self.fmt == "chat_template":
            rendered = self._render([[_user(p)] for p in texts], generation=True)
            spans = [_span_of(r, p, last=True) for r, p in zip(rendered, texts, strict=True)]
            return self.ids(rendered, add_special_tokens=False, spans=spans, part="prompt")
        return [self._chatglm3_ids([_user(p)], generation=True) for p in texts]

    def conversation_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """What generation starts from in a chat: user and assistant turns, the last one the
        user's, joined the format's way (a chat template's or ChatGLM3's roles). Plain has no
        roles: each earlier exchange is encoded as a training row, one after the other, as
        packing lays rows out, then the new prompt."""
        if self.fmt == "chat_template":
            text = self._render([messages], generation=True)[0]
            return self.ids([text], add_special_tokens=False, part="prompt")[0]
        if self.fmt == "chatglm3":
            return self._chatglm3_ids(messages, generation=True)
        *earlier, last = messages
        ids: list[int] = []
        for user, answer in zip(earlier[0::2], earlier[1::2], strict=True):
            p, r = self.encode([user["content"]], [answer["content"]])
            ids += p[0] + r[0]
        return ids + self.prompt_ids([last["content"]])[0]

    def _chatglm3_ids(self, messages: list[dict[str, str]], generation: bool = False) -> list[int]:
        from runner.models.chatglm.tokenizer import encode_chatglm3_messages

        with special_splitting(self.tok, None):  # it sets the switch; put it back after
            return encode_chatglm3_messages(self.tok, messages, add_generation_prompt=generation)

    def _render(self, conversations: list[list[dict[str, str]]], generation: bool) -> list[str]:
        texts = self.tok.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=generation
        )
        return [str(t) for t in texts]

    def _chat_template(
        self, prompts: list[str], responses: list[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        heads = self._render([[_user(p)] for p in prompts], generation=True)
        fulls = self._render(
            [
                [_user(p), {"role": "assistant", "content": r}]
                for p, r in zip(prompts, responses, strict=True)
            ],
            generation=False,
        )
        tails = []
        for head, full in zip(heads, fulls, strict=True):
            if not full.startswith(head):
                raise RecipeError(
                    "template.format: the tokenizer's chat template does not render the "
                    "conversation as the prompt (with the generation prompt) followed by the "
                    'reply, so the reply cannot be told apart for the loss; use format = "plain"'
                )
            tails.append(full[len(head) :])
        head_spans = [_span_of(h, p, last=True) for h, p in zip(heads, prompts, strict=True)]
        tail_spans = [_span_of(t, r) for t, r in zip(tails, responses, strict=True)]
        p = self.ids(heads, add_special_tokens=False, spans=head_spans, part="prompt")
        r = self.ids(tails, add_special_tokens=False, spans=tail_spans, part="response")
        return p, [ids if self.eos in ids else [*ids, self.eos] for ids in r]

    def _chatglm3(
        self, prompts: list[str], responses: list[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        p_out, r_out = [], []
        for prompt, response in zip(prompts, responses, strict=True):
            head = self._chatglm3_ids([_user(prompt)], generation=True)
            full = self._chatglm3_ids([_user(prompt), {"role": "assistant", "content": response}])
            p_out.append(head)
            r_out.append([*full[len(head) :], self.eos])
        return p_out, r_out

    # Conversations (dataset.format = messages / sharegpt / alpaca): the rendered conversation
    # in pieces, each masked or trained as a whole; a piece is text (encoded with its data
    # spans, see `ids`) or ready ids. The boundaries come from rendering prefixes, never from
    # searching the text: chat_template renders the turns before each assistant turn with the
    # generation prompt (what is masked up to there) and with that turn (what it adds is the
    # turn); chatglm3 does the same with ChatGLM3's role tokens; plain writes role lines.

    def conversation(self, messages: Conversation, where: str = "") -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation (ending with an assistant turn) and, per token,
        whether it is trained: the assistant turns whose `train` is true, each with the end of
        its turn (the template's end-of-turn text, ChatGLM3's next role token, plain's eos), and
        an eos after the last turn when the template's turn does not end with it."""
        ids: list[int] = []
        trained: list[bool] = []
        piece_ids: list[int] = []
        for piece_ids, train in self._encoded(self._pieces(messages, False, where)):
            ids += piece_ids
            trained += [train] * len(piece_ids)
        if self.fmt != "plain" and self.eos not in piece_ids:
            ids.append(self.eos)
            trained.append(bool(messages[-1].get("train")))
        if self.fmt == "chatglm3":  # ChatGLM3 stops at the next role token: it is trained too
            ends = [i for i in range(1, len(ids)) if trained[i - 1] and not trained[i]]
            for i in ends:
                trained[i] = True
        return ids, trained

    def conversation_prompt_ids(self, messages: Conversation, where: str = "") -> list[int]:
        """What generation starts from for a conversation ending with a user turn."""
        return [
            i
            for piece_ids, _ in self._encoded(self._pieces(messages, True, where))
            for i in piece_ids
        ]

    def _encoded(self, pieces: list[Piece]) -> list[tuple[list[int], bool]]:
        texts = [(i, p) for i, p in enumerate(pieces) if isinstance(p[0], str)]
        encoded = self.ids(
            [str(p[0]) for _, p in texts], add_special_tokens=False, spans=[p[2] for _, p in texts]
        )
        out: list[tuple[list[int], bool]] = [
            (list(p[0]) if not isinstance(p[0], str) else [], p[1]) for p in pieces
        ]
        for (i, p), ids in zip(texts, encoded, strict=True):
            out[i] = (ids, p[1])
        return out

    def _pieces(self, messages: Conversation, generation: bool, where: str) -> list[Piece]:
        plain = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        if self.fmt == "plain":
            return self._plain_pieces(messages, generation)
        pieces: list[Piece] = []
        done: Any = "" if self.fmt == "chat_template" else []
        start = 0  # first message not yet in a piece

        def render(upto: int, gen: bool) -> Any:
            if self.fmt == "chatglm3":
                return self._chatglm3_ids(plain[:upto], generation=gen)
            return self._render_one(plain[:upto], gen, where)

        def masked(head: Any, upto: int) -> Piece:
            part = head[len(done) :]
            if isinstance(part, str):
                return part, False, _spans_in(part, [m["content"] for m in plain[start:upto]])
            return part, False, None

        for k, m in enumerate(plain):
            if m["role"] != "assistant":
                continue
            head, full = render(k, True), render(k + 1, False)
            if head[: len(done)] != done or full[: len(head)] != head:
                raise RecipeError(
                    f"template.format: {where or 'a conversation'}: the tokenizer's chat "
                    f"template renders the turns before assistant message {k + 1} differently "
                    "once later turns follow (or the reply does not extend the generation "
                    "prompt), so the turns cannot be told apart for the loss; use "
                    'template.format = "plain" or a chat template that renders turns in order'
                )
            pieces.append(masked(head, k))
            reply = full[len(head) :]
            spans = _span_of(reply, m["content"]) if isinstance(reply, str) else None
            pieces.append((reply, bool(messages[k].get("train")), spans))
            done, start = full, k + 1
        if generation:
            pieces.append(masked(render(len(plain), True), len(plain)))
        return pieces

    def _plain_pieces(self, messages: Conversation, generation: bool) -> list[Piece]:
        """`role: text` lines after the tokenizer's leading special tokens; an assistant turn
        is `assistant: ` (masked), its text and the eos (trained when the turn is)."""
        pieces: list[Piece] = [(self.affixes()[0], False, None)]
        text, spans = "", []
        for m in messages:
            role, content = str(m["role"]), str(m["content"])
            if role != "assistant":
                text += f"{role}: "
                spans.append((len(text), len(text) + len(content)))
                text += content + "\n"
                continue
            pieces.append((text + "assistant: ", False, spans))
            train = bool(m.get("train"))
            pieces += [(content, train, [(0, len(content))]), ([self.eos], train, None)]
            text, spans = "", []
        if generation:
            pieces.append((text + "assistant: ", False, spans))
        return pieces

    def _render_one(self, messages: list[dict[str, str]], generation: bool, where: str) -> str:
        try:
            text = self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise RecipeError(
                f"template.format: {where or 'a conversation'}: the tokenizer's chat template "
                f"failed: {first}"
            ) from None
        return str(text)

    def turn_problems(self) -> list[str]:
        """Why this chat template cannot mark the turns of a conversation, tried on a small
        made-up one (lint: a warning per problem); [] when it can, or for other formats."""
        if self.fmt != "chat_template":
            return []
        probe: list[dict[str, Any]] = [
            {"role": "system", "content": "Be brief.", "train": False},
            {"role": "user", "content": "Hi.", "train": False},
            {"role": "assistant", "content": "Hello.", "train": True},
            {"role": "user", "content": "Bye.", "train": False},
            {"role": "assistant", "content": "Goodbye.", "train": True},
        ]
        problems = []
        # without a system message first: a template may refuse those, which is worth its own line
        for tried, what in ((probe[1:], ""), (probe, " with a system message")):
            try:
                self._pieces(tried, False, f"a made-up conversation{what}")
            except RecipeError as e:
                problems.append(str(e).removeprefix("template.format: "))
                break
        try:
            bare = self._render_one(probe[1:2], False, "")
            if self._render_one(probe[1:2], True, "") == bare:
                problems.append(
                    "the tokenizer's chat template adds nothing for add_generation_prompt (no "
                    "assistant header): the header of each reply is trained with it, and "
                    "generation starts without it"
                )
        except RecipeError:
            pass
        return problems


Conversation = Sequence[Mapping[str, Any]]
Piece = tuple[str | list[int], bool, list[tuple[int, int]] | None]


def _spans_in(text: str, contents: list[str]) -> list[tuple[int, int]] | None:
    """Where the contents of consecutive messages are in their rendered text, in order; None
    (the plain rule) when the template changed one."""
    spans, at = [], 0
    for content in contents:
        if not content:
            continue
        found = text.find(content, at)
        if found < 0:
            return None
        spans.append((found, found + len(content)))
        at = found + len(content)
    return spans


def _user(prompt: str) -> dict[str, str]:
    return {"role": "user", "content": prompt}


def _span_of(text: str, content: str, last: bool = False) -> list[tuple[int, int]] | None:
    """Where a message's content is in the rendered chat text; None (the plain rule) when the
    chat template changed it."""
    if not content:
        return []
    at = text.rfind(content) if last else text.find(content)
    return [(at, at + len(content))] if at >= 0 else None


@contextlib.contextmanager
def special_splitting(tok: Any, split: bool | None) -> Iterator[None]:
    """Set a fast tokenizer's `encode_special_tokens` for one call (None: leave it to the call)
    and put the old value back: a flag left set by one encoding must not change the next."""
    backend = getattr(tok, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_special_tokens"):
        yield
        return
    before = backend.encode_special_tokens
    if split is not None:
        backend.encode_special_tokens = split
    try:
        yield
    finally:
        backend.encode_special_tokens = before


def template_literals(recipe: Any) -> dict[str, str]:
    """The recipe's prompt and response template sources: special-token strings written there
    are the author's and stay control tokens (plain format)."""
    from runner.data.templates import template_sources

    return {part: t.source for part, t in template_sources(recipe).items()}

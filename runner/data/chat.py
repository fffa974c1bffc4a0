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
"""

from __future__ import annotations

from typing import Any

from runner.errors import RecipeError

FORMATS = ("plain", "chat_template", "chatglm3")
CHATGLM3_TOKENS = ("[gMASK]", "sop", "<|user|>", "<|assistant|>")


class Encoder:
    """Token ids of prompts and responses for one tokenizer and one format."""

    def __init__(self, tok: Any, fmt: str, where: str = "template.format") -> None:
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
        self.special = set(tok.all_special_ids) | {
            i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special
        }

    def ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """`tok(texts)["input_ids"]`; straight from a fast tokenizer's backend when it truncates
        and pads nothing: the same ids without offsets, attention masks and a Python object per
        row (about a quarter less CPU on the demo data)."""
        backend = getattr(self.tok, "_tokenizer", None)
        if (
            getattr(self.tok, "is_fast", False)
            and backend is not None
            and backend.truncation is None
            and backend.padding is None
        ):
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets
            encodings = encode(texts, add_special_tokens=add_special_tokens)
            return [e.ids for e in encodings]
        return list(self.tok(texts, add_special_tokens=add_special_tokens)["input_ids"])

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
            p = self.ids(prompts, add_special_tokens=True)
            r = self.ids(responses, add_special_tokens=False)
            return p, [[*ids, self.eos] for ids in r]
        if self.fmt == "chat_template":
            return self._chat_template(prompts, responses)
        return self._chatglm3(prompts, responses)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """What generation starts from: the prompt as the format presents it to the model."""
        if self.fmt == "plain":
            return list(self.tok(prompts, add_special_tokens=True)["input_ids"])
        if self.fmt == "chat_template":
            texts = self._render([[_user(p)] for p in prompts], generation=True)
            return list(self.tok(texts, add_special_tokens=False)["input_ids"])
        from runner.models.chatglm.tokenizer import encode_chatglm3_messages

        return [
            encode_chatglm3_messages(self.tok, [_user(p)], add_generation_prompt=True)
            for p in prompts
        ]

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
        p = self.ids(heads, add_special_tokens=False)
        r = self.ids(tails, add_special_tokens=False)
        return p, [ids if self.eos in ids else [*ids, self.eos] for ids in r]

    def _chatglm3(
        self, prompts: list[str], responses: list[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        from runner.models.chatglm.tokenizer import encode_chatglm3_messages

        p_out, r_out = [], []
        for prompt, response in zip(prompts, responses, strict=True):
            head = encode_chatglm3_messages(self.tok, [_user(prompt)], add_generation_prompt=True)
            full = encode_chatglm3_messages(
                self.tok, [_user(prompt), {"role": "assistant", "content": response}]
            )
            p_out.append(head)
            r_out.append([*full[len(head) :], self.eos])
        return p_out, r_out


def _user(prompt: str) -> dict[str, str]:
    return {"role": "user", "content": prompt}

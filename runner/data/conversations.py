"""Conversation rows (dataset.format = messages, sharegpt, alpaca) -> one checked list of
messages per row, the format stage's logic for conversations (no torch, no tokenizer).

Every format becomes the same `messages` form: a list of {"role", "content", "train"} with roles
system, user and assistant; `train` says which assistant turns carry the loss (template.
train_turns). The tokenize stage renders it turn by turn (runner/data/chat.py); the formatted
rows keep it as JSON in the MESSAGES column, next to a readable `prompt` (the turns before the
last assistant turn) and `response` (that turn), which compare scores.

Bad data is a `ConversationError` naming the row and the field (dataset.bad_rows = "drop" skips
such rows instead). Tool turns are refused: the formats here carry no tool schema, and a tool
call rendered as text would teach the model a format no runtime parses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.errors import RecipeError
from runner.recipe import Recipe

FORMATS = ("template", "messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython", "tool_call")
MESSAGES = "messages"  # the formatted rows' column of conversations, as JSON


class ConversationError(RecipeError):
    """A row's conversation is malformed; `describe` names the data, the row and the field."""

    def describe(self, source: str, split: str, number: int, drop_hint: bool = True) -> str:
        also = ', or set dataset.bad_rows = "drop" to skip such rows' if drop_hint else ""
        return f"{source}: {split} row {number}: {self}{also}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a dict"
    return type(value).__name__


@dataclass(frozen=True)
class Conversations:
    """The recipe's conversation settings: how a row becomes messages."""

    fmt: str  # messages | sharegpt | alpaca
    fields: dict[str, str]  # [dataset.<fmt>] as resolved (column and field names)
    train_turns: str = "last"
    system: str | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Conversations | None:
        """None for dataset.format = "template"."""
        fmt = recipe.section("dataset").get("format", "template")
        if fmt == "template":
            return None
        section = recipe.section("template")
        return cls(
            fmt,
            dict(recipe.section("dataset").get(fmt, {})),
            section.get("train_turns", "last"),
            section.get("system"),
        )

    def columns(self) -> tuple[list[str], list[str]]:
        """(columns a row must have, columns used when present)."""
        if self.fmt == "alpaca":
            f = self.fields
            return [f["instruction"], f["output"]], [f["input"], f["system"]]
        return [self.fields["column"]], []

    def check_columns(self, names: list[str], where: str, shown: list[str]) -> None:
        required, _ = self.columns()
        missing = [c for c in required if c not in names]
        if missing:
            key = (
                "column"
                if self.fmt != "alpaca"
                else next(k for k, v in self.fields.items() if v == missing[0])
            )
            raise RecipeError(
                f"{where}: $.dataset.{self.fmt}.{key}: no column {missing[0]!r}; the data has: "
                f"{', '.join(shown)}"
            )

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's checked conversation, with the system prompt and the train flags."""
        raw = self._alpaca(row) if self.fmt == "alpaca" else self._turns(row)
        if not any(m["role"] == "system" for m in raw) and self.system:
            raw.insert(0, {"role": "system", "content": self.system, "flag": None, "n": 0})
        return self._checked(raw)

    def _alpaca(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        f = self.fields
        values = {}
        for key in ("instruction", "input", "output", "system"):
            value = row.get(f[key])
            if value is None and key in ("input", "system"):
                value = ""
            if not isinstance(value, str):
                raise ConversationError(f"column {f[key]!r} is {_kind(value)}, not text")
            values[key] = value
        user = values["instruction"]
        if values["input"].strip():
            user += "\n" + values["input"]
        out = [
            {"role": "user", "content": user, "flag": None, "n": 1},
            {"role": "assistant", "content": values["output"], "flag": None, "n": 2},
        ]
        if values["system"].strip():
            out.insert(0, {"role": "system", "content": values["system"], "flag": None, "n": 0})
        return out

    def _turns(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        f = self.fields
        column = f["column"]
        value = row.get(column)
        if isinstance(value, str):  # a CSV cell (or a JSON string) holding the list
            try:
                value = json.loads(value)
            except ValueError:
                raise ConversationError(
                    f"column {column!r} is text that is not a JSON list of messages"
                ) from None
        if not isinstance(value, list | tuple):
            raise ConversationError(f"column {column!r} is {_kind(value)}, not a list of messages")
        if not value:
            raise ConversationError(f"column {column!r} is an empty conversation")
        names = (
            {f["user"]: "user", f["assistant"]: "assistant", f["system"]: "system"}
            if self.fmt == "sharegpt"
            else {r: r for r in ROLES}
        )
        out = []
        for n, message in enumerate(value, start=1):
            at = f"column {column!r}, message {n}"
            if not isinstance(message, dict):
                raise ConversationError(f"{at} is {_kind(message)}, not an object")
            role = message.get(f["role"])
            if role is None:
                raise ConversationError(f"{at}: no field {f['role']!r} (the role)")
            if role not in names:
                if role in TOOL_ROLES:
                    raise ConversationError(
                        f"{at}: {f['role']!r} is {role!r}: tool turns are not supported; "
                        "leave them out of the data"
                    )
                known = ", ".join(map(repr, names))
                hint = f" (name yours in [dataset.{self.fmt}])" if self.fmt == "sharegpt" else ""
                raise ConversationError(f"{at}: {f['role']!r} is {role!r}; use {known}{hint}")
            content = message.get(f["content"])
            if not isinstance(content, str):
                what = "missing" if f["content"] not in message else _kind(content)
                raise ConversationError(f"{at}: {f['content']!r} is {what}, not text")
            flag = message.get(f["train"])
            if flag is not None and not isinstance(flag, bool):
                raise ConversationError(f"{at}: {f['train']!r} is {flag!r}, not true or false")
            out.append({"role": names[role], "content": content, "flag": flag, "n": n})
        return out

    def _checked(self, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
        column = "the conversation" if self.fmt == "alpaca" else f"column {self.fields['column']!r}"
        systems = [m for m in raw if m["role"] == "system"]
        if systems and (raw[0]["role"] != "system" or len(systems) > 1):
            late = next(m for i, m in enumerate(raw) if m["role"] == "system" and i > 0)
            raise ConversationError(
                f"{column}, message {late['n']}: a system message after the first message; "
                "a conversation has at most one, first"
            )
        turns = [m for m in raw if m["role"] != "system"]
        if not turns:
            raise ConversationError(f"{column} has no user or assistant message")
        if turns[0]["role"] != "user":
            raise ConversationError(
                f"{column}, message {turns[0]['n']}: the conversation starts with "
                f"{turns[0]['role']!r}; it must start with a user message (after a system one)"
            )
        if raw[-1]["role"] != "assistant":
            raise ConversationError(
                f"{column}: the conversation ends with a {raw[-1]['role']!r} message, not an "
                "assistant turn to train; end it with the assistant's reply"
            )
        last = len(raw) - 1
        out = []
        for i, m in enumerate(raw):
            if self.train_turns == "flagged" and m["flag"] and m["role"] != "assistant":
                raise ConversationError(
                    f"{column}, message {m['n']}: {self.fields['train']!r} is true on a "
                    f"{m['role']!r} message; only assistant turns are trained"
                )
            train = m["role"] == "assistant" and (
                self.train_turns == "all"
                or (self.train_turns == "last" and i == last)
                or (self.train_turns == "flagged" and bool(m["flag"]))
            )
            out.append({"role": m["role"], "content": m["content"], "train": train})
        return out


def readable(messages: list[dict[str, Any]]) -> str:
    """The turns as `role: text` lines, for reports (compare shows it as the prompt)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def dumps(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, ensure_ascii=False)


def loads(text: str) -> list[dict[str, Any]]:
    value: list[dict[str, Any]] = json.loads(text)
    return value

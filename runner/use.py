"""Use a trained recipe: `recipe generate` and `recipe chat`.

The model is loaded the way compare loads it (the base quantized as the recipe says, the adapter
from <run dir>/adapter on top, or the base alone with `base=True`); prompts are encoded and
decoded by runner.models.generate, so what you see here is what compare's "after" column shows.
`recipe chat` keeps the conversation: each line is a user turn, rendered through the prompt
template, and the model sees the earlier turns and its replies joined the way its format joins
turns (runner.data.chat.Encoder.conversation_ids); `/reset` starts over, `/exit` ends. The first
turn is exactly what `recipe generate` and compare give.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.quiet import quiet_libraries
from runner.recipe import Recipe
from runner.rundir import ADAPTER

Echo = Callable[[str], None]
QUIT = ("/quit", "/exit")
RESET = "/reset"


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when inside it."""
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def adapter_dir(recipe: Recipe) -> Path:
    return recipe.run_dir / ADAPTER


def require_adapter(recipe: Recipe, *, base_hint: bool = False) -> Path:
    """The trained adapter's folder; RecipeError (exit 2) when there is none yet. `base_hint`:
    the command has --base, say so."""
    folder = adapter_dir(recipe)
    if not (folder / "adapter_config.json").is_file():
        hint = " (or pass --base for the base model alone)" if base_hint else ""
        raise RecipeError(
            f"{shown(folder)}: no trained adapter yet; run `recipe run {shown(recipe.path)}` "
            f"first{hint}"
        )
    return folder


def stale_adapter_note(recipe: Recipe) -> str | None:
    """A warning when the adapter on disk was not trained with the recipe as it is now."""
    from runner.plan import compute_plan

    for st in compute_plan(recipe):
        if st.name == "save" and st.status != "done":
            return (
                f"note: {shown(adapter_dir(recipe))} does not match the recipe as it is now "
                f"(save: {st.status}, {'; '.join(st.reasons)}); `recipe run` updates it"
            )
    return None


def decoding_settings(recipe: Recipe, max_new_tokens: int | None) -> dict[str, Any]:
    cfg = dict(recipe.section("compare"))
    if max_new_tokens is not None:
        cfg["max_new_tokens"] = max_new_tokens
    return cfg


def prompt_from_row(recipe: Recipe, row_json: str) -> str:
    """A JSON object rendered through the recipe's prompt template, as format renders rows."""
    from runner.data.templates import Renderer, template_sources

    try:
        row = json.loads(row_json)
    except json.JSONDecodeError as e:
        raise RecipeError(
            f"--row: not valid JSON ({e.msg} at column {e.colno}); "
            'pass an object such as \'{"content": "..."}\''
        ) from None
    if not isinstance(row, dict):
        raise RecipeError(
            f'--row: expected a JSON object such as \'{{"content": "..."}}\', '
            f"got {type(row).__name__}"
        )
    sources = template_sources(recipe)
    if "prompt" not in sources:
        raise RecipeError(
            f'--row: dataset.format = "{recipe.get("dataset.format")}" has no prompt template; '
            "pass the user's turn with --prompt TEXT"
        )
    return Renderer(sources).render_part("prompt", row, 0)


def template_variables(recipe: Recipe) -> list[str]:
    """The variables the prompt template needs (parsed by Jinja, not rendered)."""
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from runner.data.templates import template_sources

    prompt = template_sources(recipe).get("prompt")
    if prompt is None:  # a conversation format: a line is the user's turn
        return []
    source = prompt.source
    return sorted(meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(source)))


@dataclass
class Session:
    """A loaded model and tokenizer with the recipe's decoding settings."""

    model: Any
    tok: Any
    encoder: Any  # runner.data.chat.Encoder: prompts encoded as the tokenize stage does
    cfg: dict[str, Any]
    seed: int
    label: str  # what is answering, for the banner

    def reply(self, prompt: str) -> str:
        from runner.models.generate import generate

        return generate(self.model, self.tok, self.encoder, [prompt], self.cfg, self.seed)[0]

    def chat(self, messages: list[dict[str, str]], limit: int) -> tuple[str, int]:
        """The reply to a conversation whose last message is the user's; and how many earlier
        messages were left out so that the prompt fits in `limit` tokens (oldest first)."""
        from runner.models.generate import decode, generate_ids

        if len(messages) == 1:
            return self.reply(messages[0]["content"]), 0
        dropped = 0
        ids = self.encoder.conversation_ids(messages)
        while len(ids) > limit and len(messages) - dropped > 1:
            dropped += 2  # one exchange: a user turn and its reply
            ids = self.encoder.conversation_ids(messages[dropped:])
        out = generate_ids(self.model, self.tok, [ids], self.cfg, self.seed)
        return decode(self.tok, out)[0], dropped


def open_session(
    recipe: Recipe, *, base: bool, log: Echo, max_new_tokens: int | None = None
) -> Session:
    """Load the base (quantized as the recipe says) and, unless `base`, the trained adapter."""
    quiet_libraries()  # before the heavy imports: progress bars and import-time notices off
    folder = None if base else require_adapter(recipe, base_hint=True)
    if folder is not None:
        note = stale_adapter_note(recipe)
        if note:
            log(note)
    from runner.models.generate import prompt_encoder
    from runner.models.load import load_base, load_tokenizer
    from runner.models.resolve import materialize

    model_folder = materialize(recipe, log)
    tok = load_tokenizer(model_folder)
    model = load_base(recipe, model_folder)
    label = f"base model {recipe.get('model.name_or_path')}"
    if folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
        label = f"fine-tuned adapter {shown(folder)}"
    model.eval()
    cfg = decoding_settings(recipe, max_new_tokens)
    return Session(model, tok, prompt_encoder(recipe, tok), cfg, recipe.seed, label)


def chat_loop(
    session: Session,
    recipe: Recipe,
    lines: Iterable[str],
    say: Echo,
    note: Echo,
    marker: Callable[[], None] = lambda: None,
    raw: bool = False,
) -> int:
    """A conversation: each line is a user turn, rendered through the prompt template when it
    needs exactly one variable (unless `raw`), else used as the prompt itself; earlier turns
    and replies go with it. `/reset` forgets them, `/exit` (or `/quit`, end of input) ends.
    Returns the number of replies."""
    from runner.data.templates import Renderer, template_sources

    variables = [] if raw else template_variables(recipe)
    renderer = Renderer(template_sources(recipe)) if len(variables) == 1 else None
    if renderer:
        how = f"each line is the template's `{variables[0]}`"
    elif not raw and recipe.get("dataset.format") != "template":
        how = "each line is a user turn"
    else:
        how = "each line is the whole prompt"
    note(
        f"chat with the {session.label}: {how}; the conversation is kept "
        f"({RESET} starts over); /exit or Ctrl-D ends"
    )
    limit = int(recipe.get("tokenize.max_length"))
    history: list[dict[str, str]] = []
    replies = 0
    marker()
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip()
        if command in QUIT:
            break
        if command == RESET:
            history = []
            note("(conversation reset)")
        elif command:
            prompt = (
                renderer.render_part("prompt", {variables[0]: text}, replies) if renderer else text
            )
            history.append({"role": "user", "content": prompt})
            answer, dropped = session.chat(history, limit)
            if dropped:
                history = history[dropped:]
                note(
                    f"(the {dropped // 2} oldest exchange(s) no longer fit in "
                    f"tokenize.max_length = {limit} tokens: left out)"
                )
            history.append({"role": "assistant", "content": answer})
            say(answer)
            replies += 1
        marker()
    return replies

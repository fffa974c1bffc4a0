"""Generation the way compare, generate and chat do it: prompts encoded exactly as training
encodes them (runner.data.chat.Encoder, per template.format), stopping at every end token the
model knows, with the recipe's [compare] decoding settings."""

from __future__ import annotations

from typing import Any


def prompt_encoder(recipe: Any, tok: Any) -> Any:
    """The Encoder the tokenize stage uses for this recipe: same template format, same special
    tokens (bos, ChatGLM3's `[gMASK]sop<|user|>...<|assistant|>`, a chat template's header)."""
    from runner.data.chat import Encoder, template_literals
    from runner.data.conversations import Conversations

    where = f"{recipe.path}: $.template.format"
    from runner.recipe.mix import source_recipes

    conv = Conversations.from_recipe(recipe)  # a text prompt is then a conversation's user turn
    sources = source_recipes(recipe)
    if sources:  # a mix: text prompts are user turns only when every source is a conversation
        convs = [Conversations.from_recipe(s.recipe) for s in sources]
        conv = convs[0] if all(c is not None for c in convs) else None
    return Encoder(
        tok,
        recipe.get("template.format"),
        where,
        template_literals(recipe),
        turns=conv is not None,
        system=conv.system if conv is not None else None,
    )


def stop_token_ids(model: Any, tok: Any) -> list[int]:
    """The model's generation_config eos ids (a list for ChatGLM3: `</s>`, `<|user|>`,
    `<|observation|>`) followed by the tokenizer's eos, without duplicates."""
    raw = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = list(raw) if isinstance(raw, list | tuple) else [raw]
    ids: list[int] = []
    for value in [*candidates, tok.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def decoding(cfg: dict[str, Any]) -> dict[str, Any]:
    """generate() keyword arguments from a [compare]-shaped table: greedy, or seeded sampling."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": cfg["max_new_tokens"],
        "do_sample": cfg["do_sample"],
    }
    if cfg["do_sample"]:
        kwargs.update(temperature=cfg["temperature"], top_p=cfg["top_p"])
    else:  # no sampling knobs left over from the model's generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_ids(
    model: Any,
    tok: Any,
    prompt_ids: list[list[int]],
    cfg: dict[str, Any],
    seed: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """New token ids per prompt, cut before the first stop token. Batches are left-padded."""
    import torch

    stops = stop_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    out: list[list[int]] = []
    torch.manual_seed(seed)
    for start in range(0, len(prompt_ids), batch_size):
        batch = tok.pad(
            {"input_ids": prompt_ids[start : start + batch_size]},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        with torch.no_grad():
            generated = model.generate(
                **batch, **decoding(cfg), eos_token_id=stops, pad_token_id=pad
            )
        for row in generated[:, batch["input_ids"].shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def decode(tok: Any, ids: list[list[int]]) -> list[str]:
    """Text per row: special tokens dropped, surrounding whitespace (ChatGLM3's "\\n") stripped."""
    return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]


def generate(
    model: Any, tok: Any, encoder: Any, prompts: list[str], cfg: dict[str, Any], seed: int
) -> list[str]:
    """Generated text per rendered prompt."""
    if not prompts:
        return []
    return decode(tok, generate_ids(model, tok, encoder.prompt_ids(prompts), cfg, seed))

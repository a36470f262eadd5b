"""New tokens: `data.add_special_tokens` and a chat template's own markers that the vocabulary lacks.

A ChatML template (`<|im_start|>`, `<|im_end|>`) on a base whose tokenizer does not have those tokens splits each
marker into several text pieces; asked for, or found in the template the data is rendered with, lorafuse adds them
as special tokens instead. The embedding and the output head then grow to `len(tokenizer)` rows (transformers'
`resize_token_embeddings`; never shrunk: some bases carry spare rows beyond the tokenizer, and a token added
there takes a spare row), the new rows of the frozen tables are set to the mean of the trained rows of each table,
and the run trains exactly those rows (lora/token_rows.py), started as `lora.token_row_init` says
(model/untrained_tokens.py). The adapter folder holds
the tokenizer with the new tokens and the rows; docs/tokens.md says how peft + transformers load it.

Template markers: the strings of the form `<|name|>` in the template's text for a short conversation, when the
tokenizer does not map each to one token. Only that form: `[INST]`-style markers are ordinary text a base was
trained on, and turning them into a fresh row would throw that away.
"""

from __future__ import annotations

import re

import torch

from lorafuse.errors import ConfigError

MARKER = re.compile(r"<\|[A-Za-z0-9_.-]+\|>")
_PROBE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
]


def template_markers(tokenizer) -> list[str]:
    """`<|name|>` markers in the tokenizer's chat template that are not single tokens of its vocabulary."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    texts = []
    for messages in (_PROBE, _PROBE[1:]):  # some templates reject a system turn
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except Exception:  # a template's own error for this conversation shape: nothing to learn from it
            continue
    vocab = tokenizer.get_vocab()
    found = dict.fromkeys(m for text in texts for m in MARKER.findall(text))
    return [m for m in found if m not in vocab]


def add_tokens(model, tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` (those the vocabulary lacks) to the tokenizer as special tokens, grow the model's tables to
    `len(tokenizer)` rows if needed and set the new rows to each table's mean trained row (model None: the
    tokenizer only, as `lorafuse data preview` needs it). Returns the new ids."""
    for t in tokens:
        if not isinstance(t, str) or not t or t != t.strip():
            raise ConfigError(
                f"data.add_special_tokens has {t!r}, which is not a token",
                "list the exact token strings, without surrounding spaces, e.g. ['<|im_start|>', '<|im_end|>']",
            )
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if not missing:
        return []
    tokenizer.add_tokens(missing, special_tokens=True)  # never split, skipped when decoding without specials
    new_ids = tokenizer.convert_tokens_to_ids(missing)
    if model is not None:
        _grow(model, len(tokenizer), new_ids)
    return list(new_ids)


def _grow(model, size: int, new_ids: list[int]) -> None:
    from lorafuse.lora.token_rows import tables
    from lorafuse.model.untrained_tokens import check_table

    emb, head, tied = tables(model)
    old = emb.weight.shape[0]
    if size > old:
        model.resize_token_embeddings(size, mean_resizing=False)  # rows below are set here, not drawn at random
        emb, head, tied = tables(model)
    with torch.no_grad():
        for module in (emb,) if tied or head is None else (emb, head):
            w = module.weight
            known = min(old, min(new_ids))  # the rows that were there before this call
            mean = check_table("table", lambda a, b, w=w: w[a:b].detach(), known).mean
            w[torch.tensor(new_ids, device=w.device)] = mean.to(w.device, w.dtype)


def add_run_tokens(model, tokenizer, special_tokens, chat: bool, train_untrained: str, console) -> list[int]:
    """A run's new tokens, before its data is tokenized: `special_tokens` (data.add_special_tokens), plus
    (train_untrained "auto", `chat`: the data is rendered with the chat template) the template's markers. Says what it
    added. Returns the new ids. model None: the tokenizer only (`lorafuse data preview`)."""
    wanted = list(special_tokens)
    if train_untrained == "auto" and chat:
        wanted += template_markers(tokenizer)
    before = len(tokenizer)
    new_ids = add_tokens(model, tokenizer, wanted)
    if new_ids:
        names = ", ".join(tokenizer.convert_ids_to_tokens(new_ids))
        rows = "" if model is None else f"; the model's tables have {model.get_input_embeddings().weight.shape[0]} rows"
        console.print(
            f"new tokens: {names} added to the tokenizer ({before} -> {len(tokenizer)} tokens{rows}); their rows "
            "start around the trained rows (lora.token_row_init) and are trained",
            highlight=False,
            markup=False,
        )
    return new_ids

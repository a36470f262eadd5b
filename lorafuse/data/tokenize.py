"""Samples -> token ids and labels, with the loss mask, BOS/EOS and truncation policy in one place.

Output per kept row: `input_ids` (list[int], length L <= max_length) and `labels` (list[int], length L), where
`labels[t] = input_ids[t]` if token t is trained and -100 otherwise. Labels are NOT pre-shifted: position t's logits
predict `labels[t + 1]`, as transformers' causal-LM loss does. `labels[0]` is always -100 (nothing predicts the
first token), so `count(labels != -100)` is exactly the number of predicted targets, and packed rows never train
one sequence's last token to predict the next sequence's first.

Plain template (chunks of (prompt, target)):
    ids = BOS-prefix + tok(prompt_1 + target_1) + [EOS] + tok(prompt_2 + target_2) + [EOS] ...
  BOS-prefix is whatever the tokenizer itself puts before text (probed once: `<s>` for Llama, nothing for Qwen).
  Each chunk is tokenized as ONE string, so the target's first token is the same one the model sees after the
  prompt at inference (SentencePiece would otherwise add a space-prefix token to a separately tokenized target).
  The prompt/target boundary is then checked: when tok(prompt) is not a prefix of tok(prompt + target) (a BPE
  merge across the boundary, or a whitespace run split differently), that chunk falls back to
  tok(prompt) + tok(target), so the prompt tokens always equal the inference prompt; `boundary_fixes` counts these.
  EOS is appended after every target (not if the target text already ends in EOS) and is trained.

Chat template (messages): the tokenizer's `apply_chat_template` renders the row (it emits BOS itself, text is
tokenized without special tokens, so BOS is never doubled). Trained tokens = assistant turns: from
`return_assistant_tokens_mask` when the template has `{% generation %}` tags, else turn by turn by the prefix
method (render messages[:k] with the generation prompt and messages[:k+1]; the new tokens are turn k, minus the
whitespace separator the template writes after a turn, so both methods agree). The row ends with a trained EOS:
the template's own when it writes EOS inside or right after the last assistant span, else one appended there
(never two). Tokens after it carry no loss and are dropped.

`completion_only=False` trains every token (except position 0). Rows longer than `max_length` keep their first
`max_length` tokens; rows left with no trained token are dropped and counted by reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lorafuse.data.formats import Sample
from lorafuse.errors import DataError

IGNORE = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
DROP_NO_TARGET = "no trained token (no assistant turn)"
DROP_TRUNCATED = "targets cut off by max_length"


@dataclass
class TokenizedRows:
    """Token ids/labels of the kept rows plus what happened to the others."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # source row index of each kept example
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> source row indices
    truncated: int = 0
    longest_prompt: int = 0  # most leading untrained tokens of any row (before truncation)
    shortest_row: int = 0  # fewest tokens of any row (before truncation)
    longest_row: int = 0
    boundary_fixes: int = 0
    empty_targets: list[int] = field(default_factory=list)  # source rows kept that train special tokens only
    template: str = "plain"


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before text with its default `add_special_tokens=True` (BOS, or nothing)."""
    probe = "a"
    with_special = tokenizer(probe)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def has_generation_tags(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def tokenize_samples(
    samples: list[Sample],
    tokenizer,
    template: str,
    max_length: int,
    completion_only: bool = True,
    where=lambda i: f"row {i + 1}",
) -> TokenizedRows:
    """Token ids and labels for `samples` (all plain or all chat, per `template`)."""
    eos = eos_id(tokenizer)
    if template == "chat":
        encoded, fixes = _chat_encode(samples, tokenizer, eos, where), 0
    else:
        encoded, fixes = _plain_encode(samples, tokenizer, eos)
    special = {eos, *getattr(tokenizer, "all_special_ids", [])}
    out = keep_rows(encoded, max_length, completion_only, template, special)
    out.boundary_fixes = fixes
    return out


def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id; DataError when it has none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no EOS token, so the model could not learn to stop.",
            "use a tokenizer with an eos_token (set tokenizer.eos_token before building the data).",
        )
    return eos


def keep_rows(
    encoded: list, max_length: int, completion_only: bool = True, template: str = "plain", special=frozenset()
) -> TokenizedRows:
    """Encoded (ids, labels) rows -> the kept ones, truncated to max_length; the others counted by reason. A kept row
    whose targets are all `special` ids (EOS alone: an empty answer) is listed in `empty_targets`."""
    out = TokenizedRows(template=template)
    lengths = []
    for i, (ids, labels) in enumerate(encoded):
        lengths.append(len(ids))
        if not completion_only:
            labels = list(ids)
        if labels:
            labels[0] = IGNORE
        prompt_len = next((k for k, lab in enumerate(labels) if lab != IGNORE), len(labels))
        out.longest_prompt = max(out.longest_prompt, prompt_len)
        if prompt_len == len(labels):
            out.dropped.setdefault(DROP_NO_TARGET, []).append(i)
            continue
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if prompt_len >= max_length:
                out.dropped.setdefault(DROP_TRUNCATED, []).append(i)
                continue
        if all(t == IGNORE or t in special for t in labels):
            out.empty_targets.append(i)
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.rows.append(i)
    out.shortest_row, out.longest_row = (min(lengths), max(lengths)) if lengths else (0, 0)
    return out


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` without special tokens, in one batched call to the Rust tokenizer."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None)
    if encode is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    # One call through transformers first: it puts the backend in the state its own __call__ uses (no
    # truncation/padding, its special-token splitting); then the backend directly, without offsets and without
    # transformers' per-row conversion, which costs as much as the tokenization itself here.
    tokenizer(texts[:1], add_special_tokens=False)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _plain_encode(samples: list[Sample], tokenizer, eos: int) -> tuple[list, int]:
    """[(ids, labels)] per sample, and how many chunk boundaries needed the separate-tokenization fallback."""
    chunks = [c for s in samples for c in s.chunks]
    full = _batch_ids(tokenizer, [p + t for p, t in chunks])
    prompt = _batch_ids(tokenizer, [p for p, _ in chunks])
    bad = [k for k, (f, p) in enumerate(zip(full, prompt)) if f[: len(p)] != p]
    fixed = dict(zip(bad, _batch_ids(tokenizer, [chunks[k][1] for k in bad])))
    start = bos_prefix(tokenizer)
    encoded, k = [], 0
    for s in samples:
        ids, labels = list(start), [IGNORE] * len(start)
        for _ in s.chunks:
            n_prompt = len(prompt[k])
            chunk_ids = prompt[k] + fixed[k] if k in fixed else full[k]
            if not chunk_ids or chunk_ids[-1] != eos:
                chunk_ids = chunk_ids + [eos]
            ids += chunk_ids
            labels += [IGNORE] * n_prompt + chunk_ids[n_prompt:]
            k += 1
        encoded.append((ids, labels))
    return encoded, len(bad)


def _render(tokenizer, conversations, where, first: int, **kw):
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kw)
    except Exception as e:  # jinja raises its own errors (e.g. "System role not supported")
        raise DataError(
            f"the tokenizer's chat template failed on {where(first)} (or a row after it): {type(e).__name__}: {e}",
            "fix the row's roles/turns for this model's template, drop data.system_prompt if the "
            "template rejects system messages, or set data.template=plain.",
        ) from None


def _chat_encode(samples: list[Sample], tokenizer, eos: int, where) -> list:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "data.template=chat, but the tokenizer has no chat template.",
            "set data.template=plain (or auto), or use a tokenizer that ships a chat template.",
        )
    encoded = []
    if has_generation_tags(tokenizer):
        step = 256
        for lo in range(0, len(samples), step):
            convs = [s.messages for s in samples[lo : lo + step]]
            r = _render(tokenizer, convs, where, lo, return_assistant_tokens_mask=True)
            encoded += [(list(ids), [bool(m) for m in mask]) for ids, mask in zip(r["input_ids"], r["assistant_masks"])]
    else:
        encoded = [_prefix_mask(tokenizer, s.messages, where, i) for i, s in enumerate(samples)]
    encoded = [_end_with_eos(ids, mask, eos) for ids, mask in encoded]
    return [(ids, [t if m else IGNORE for t, m in zip(ids, mask)]) for ids, mask in encoded]


def _prefix_mask(tokenizer, messages: list[dict], where, i: int) -> tuple[list[int], list[bool]]:
    """Assistant-token mask by rendering the conversation up to each assistant turn (templates without tags)."""
    full = list(_render(tokenizer, [messages], where, i)["input_ids"][0])
    mask = [False] * len(full)
    special = set(getattr(tokenizer, "all_special_ids", []))
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, [messages[:k]], where, i, add_generation_prompt=True)["input_ids"][0]
        upto = _render(tokenizer, [messages[: k + 1]], where, i)["input_ids"][0]
        lo, hi = _common_prefix(before, full), _common_prefix(upto, full)
        # the separator the template writes after a turn ("\n" in ChatML) is not part of the reply
        while hi > lo and full[hi - 1] not in special and not tokenizer.decode([full[hi - 1]]).strip():
            hi -= 1
        mask[lo:hi] = [True] * (hi - lo)
    return full, mask


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _end_with_eos(ids: list[int], mask: list[bool], eos: int) -> tuple[list[int], list[bool]]:
    """End the row with a trained EOS after the last assistant turn, never a second one.

    If the template already put EOS in (or right after) the last trained run, the row ends at that EOS;
    otherwise EOS is appended after the last trained token. Tokens after it carry no loss and are dropped.
    """
    if not any(mask):
        return ids, mask
    last = max(k for k, m in enumerate(mask) if m)
    first = last
    while first > 0 and mask[first - 1]:
        first -= 1
    if last + 1 < len(ids) and ids[last + 1] == eos:
        last += 1  # the template emits EOS right after the generation span: train it
    in_run = [k for k in range(first, last + 1) if ids[k] == eos]
    if in_run:
        last = in_run[-1]
    ids, mask = ids[: last + 1], mask[: last + 1]
    mask[last] = True
    if ids[last] != eos:
        ids, mask = ids + [eos], mask + [True]
    return ids, mask

"""data.format=preference: rows of (prompt, chosen response, rejected response) -> token rows for DPO and ORPO.

Row layouts (column names mapped with data.fields, e.g. {prompt: question, chosen: good, rejected: bad}):
  * strings: {"prompt": str, "chosen": str, "rejected": str}; the prompt may come as {"instruction", "input"}
    instead, and a "system" column (or data.system_prompt) adds a system message;
  * TRL's conversational form with a shared prefix: {"chosen": [messages], "rejected": [messages]}: the common
    leading messages are the prompt, the assistant messages after them the two responses;
  * TRL's explicit form: {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
    (a string prompt is one user message, a string response one assistant message).
Messages are {"role", "content"} objects (a column may hold them as a JSON string).

Rendering, by data.template (auto: chat for message lists when the tokenizer has a chat template, else plain):
  * plain: the prompt is written as data.prompt_format says (raw text, or the alpaca/dolly-ja headings of
    `lorafuse.data.formats.plain_prompt` around instruction and input) and each response follows it in one
    string, tokenized as the SFT plain template does (`lorafuse.data.tokenize`): BOS prefix, prompt/response
    boundary checked, EOS appended and trained. A conversation prompt must then be system + one user message.
  * chat: ids = chat_template(prompt + response), the prompt part = the tokens shared with chat_template(prompt,
    add_generation_prompt=True); the response runs to the template's EOS (appended when it writes none).
Each pair is two rows, chosen then rejected, labels -100 outside the response. Rows longer than data.max_length
keep their start. Pairs are dropped and counted when a response is empty, when chosen equals rejected, or when
the prompt fills max_length so that no response token survives; no pair left is a DataError.

Storage: a `TokenizedDataset` whose rows 2k, 2k+1 are pair k's chosen and rejected rows (`rows` holds the
source row of both), so the tokenization cache and the Batcher (with `pairs=True`) take it as is; validation
splits by pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from lorafuse.data import cache
from lorafuse.data.build import TokenizedDataset, _fill_stats, _from_lists, split_indices
from lorafuse.data.formats import Sample, plain_prompt, text_value
from lorafuse.data.readers import read_rows, source_fingerprint
from lorafuse.data.stats import DataStats
from lorafuse.data.tokenize import (
    DROP_TRUNCATED,
    IGNORE,
    _common_prefix,
    _end_with_eos,
    _plain_encode,
    _render,
    eos_id,
    keep_rows,
)
from lorafuse.errors import DataError

FIELDS = ("prompt", "chosen", "rejected", "instruction", "input", "system")
DROP_EMPTY = "empty chosen or rejected response"
DROP_SAME = "chosen and rejected are identical"
DROP_PROMPT = "prompt fills max_length (no response token left)"


@dataclass
class Pair:
    """One preference row: the prompt as messages (system?, user, ...) and the two responses (assistant messages).
    `instruction`/`input` keep a single-turn prompt's parts apart for the plain headings."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    instruction: str = ""
    input: str = ""


def read_pairs(src, fields: dict | None, system_prompt: str | None) -> tuple[list[Pair | None], dict]:
    """A Pair per row of `src` (None for a dropped row) and {reason: [row indices]} of the dropped rows."""
    unknown = sorted(set(fields or {}) - set(FIELDS))
    if unknown:
        raise DataError(
            f"data.fields names {unknown}, which format 'preference' does not use.",
            f"format 'preference' reads the fields {list(FIELDS)}; map those (e.g. data.fields.chosen=your_column).",
        )
    cols = {**{f: f for f in FIELDS}, **(fields or {})}
    pairs, dropped = [], {}
    for i, row in enumerate(src.rows):
        pair = _pair(row, cols, system_prompt, lambda i=i: src.where(i))
        reason = _bad_pair(pair)
        if reason:
            dropped.setdefault(reason, []).append(i)
            pair = None
        pairs.append(pair)
    return pairs, dropped


def _bad_pair(pair: Pair) -> str | None:
    if any(not "".join(m["content"] for m in r).strip() for r in (pair.chosen, pair.rejected)):
        return DROP_EMPTY
    return DROP_SAME if pair.chosen == pair.rejected else None


def _pair(row: dict, cols: dict, system_prompt: str | None, where) -> Pair:
    chosen, rejected = (_value(row, cols[k], where, k) for k in ("chosen", "rejected"))
    prompt = row.get(cols["prompt"])
    system = text_value(row.get(cols["system"]), where, cols["system"])
    instruction, inp = "", ""
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = _messages(chosen, where), _messages(rejected, where)
        n = _common_prefix(chosen, rejected)
        while n and chosen[n - 1]["role"] == "assistant":  # the responses start at an assistant turn
            n -= 1
        messages, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif prompt is None and row.get(cols["instruction"]) is None:
        raise DataError(
            f"{where()} has no prompt: no '{cols['prompt']}' field, no '{cols['instruction']}' field, and chosen/"
            f"rejected are not message lists with a shared beginning; the row has the fields {list(row)}.",
            "give each row a prompt (or instruction) column, map yours with data.fields.prompt=<column>, or "
            "store chosen and rejected as full conversations.",
        )
    elif isinstance(_maybe_json(prompt), list):
        messages = _messages(_maybe_json(prompt), where)
    else:
        if prompt is not None:
            instruction = text_value(prompt, where, cols["prompt"])
        else:
            instruction = text_value(row.get(cols["instruction"]), where, cols["instruction"])
            inp = text_value(row.get(cols["input"]), where, cols["input"])
        messages = [{"role": "user", "content": instruction + (f"\n\n{inp}" if inp else "")}]
    system = system or system_prompt
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return Pair(messages, _response(chosen, where), _response(rejected, where), instruction, inp)


def _value(row: dict, col: str, where, name: str):
    if row.get(col) is None:
        raise DataError(
            f"{where()} has no '{col}' field needed by data format 'preference' ({name} response); the row has "
            f"the fields {[k for k in row if row[k] is not None]}.",
            f"map your column with data.fields.{name}=<column>.",
        )
    return _maybe_json(row[col])


def _maybe_json(value):
    """A message list stored as a JSON string (CSV exports) -> the list; anything else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else value
    return value


def _messages(turns, where) -> list[dict]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "role" in t and "content" in t for t in turns):
        raise DataError(
            f"{where()}: expected a list of {{'role', 'content'}} messages, got {str(turns)[:80]!r}",
            "store conversations as JSON lists of role/content objects (TRL's conversational form).",
        )
    return [{"role": str(t["role"]), "content": text_value(t["content"], where, "content")} for t in turns]


def _response(value, where) -> list[dict]:
    if not isinstance(value, list):
        return [{"role": "assistant", "content": text_value(value, where, "chosen/rejected")}]
    messages = _messages(value, where)
    if any(m["role"] != "assistant" for m in messages):
        raise DataError(
            f"{where()}: chosen and rejected must differ only in assistant messages after the shared prompt; "
            f"a response holds the roles {[m['role'] for m in messages]}.",
            "end both conversations with the assistant reply being compared (the same turns before it).",
        )
    return messages


# ------------------------------------------------------------------------------------------------ tokens
def resolve_pair_template(template: str, tokenizer, raw_rows: list[dict]) -> str:
    """auto: chat when the rows hold message lists and the tokenizer has a chat template, else plain."""
    if template != "auto":
        return template
    conversational = any(isinstance(_maybe_json(v), list) for r in raw_rows[:1] for v in r.values())
    return "chat" if conversational and getattr(tokenizer, "chat_template", None) else "plain"


def encode_pairs(pairs: list[Pair], tokenizer, template: str, prompt_format: str, where) -> tuple[list, int]:
    """[(ids, labels)] for every pair: chosen row, then rejected row; and the plain boundary fixes."""
    eos = eos_id(tokenizer)
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                "data.template=chat, but the tokenizer has no chat template.",
                "set data.template=plain (or auto), or use a tokenizer that ships a chat template.",
            )
        rows = [
            _chat_row(p.prompt, r, tokenizer, eos, where, i)
            for i, p in enumerate(pairs)
            for r in (p.chosen, p.rejected)
        ]
        return rows, 0
    samples = []
    for i, p in enumerate(pairs):
        prompt = _plain_prompt_text(p, prompt_format, lambda i=i: where(i))
        samples += [Sample(chunks=[(prompt, "\n\n".join(m["content"] for m in r))]) for r in (p.chosen, p.rejected)]
    return _plain_encode(samples, tokenizer, eos)


def _plain_prompt_text(pair: Pair, prompt_format: str, where) -> str:
    turns = [m for m in pair.prompt if m["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise DataError(
            f"{where()}: a multi-turn prompt ({[m['role'] for m in pair.prompt]}) cannot be written with "
            "data.template=plain.",
            "set data.template=chat (the tokenizer's chat template renders the conversation).",
        )
    system = next((m["content"] for m in pair.prompt if m["role"] == "system"), None)
    instruction, inp = (pair.instruction, pair.input) if pair.instruction else (turns[0]["content"], "")
    if prompt_format == "raw":
        text = instruction + (f"\n\n{inp}" if inp else "")
        return (system + "\n\n" + text) if system else text
    return plain_prompt(prompt_format, instruction, inp, system)


def _chat_row(prompt: list[dict], response: list[dict], tokenizer, eos: int, where, i: int):
    before = list(_render(tokenizer, [prompt], where, i, add_generation_prompt=True)["input_ids"][0])
    full = list(_render(tokenizer, [prompt + response], where, i)["input_ids"][0])
    lo, hi = _common_prefix(before, full), len(full)
    special = set(getattr(tokenizer, "all_special_ids", []))
    # the separator a template writes after a turn is not part of the reply (as the SFT chat rows)
    while hi > lo and full[hi - 1] not in special and not tokenizer.decode([full[hi - 1]]).strip():
        hi -= 1
    ids, mask = _end_with_eos(full[:hi], [k >= lo for k in range(hi)], eos)
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


# ------------------------------------------------------------------------------------------------ data sets
def build_preference_datasets(data_cfg, tokenizer, seed: int = 42, cache_dir=None):
    """(train, val or None, DataStats) for data.format=preference; rows 2k, 2k+1 of each set are pair k."""
    cache_dir = cache_dir if cache_dir is not None else data_cfg.cache_dir
    stats = DataStats(format="preference", max_length=data_cfg.max_length)
    full, meta = _tokenized_pairs(data_cfg.path, data_cfg, tokenizer, cache_dir, stats)
    metas = [meta]
    if data_cfg.val_path:
        val, val_meta = _tokenized_pairs(data_cfg.val_path, data_cfg, tokenizer, cache_dir, DataStats())
        train = full
        metas.append(val_meta)
    else:
        train, val = split_pairs(full, data_cfg.val_size, seed)
    for part in (train, val):
        if part is not None:
            part.pairs = True
    stats.template = meta["template"]
    _fill_stats(stats, [train] + ([val] if val is not None else []), metas)
    stats.rows_train, stats.rows_val = stats.rows_train // 2, stats.rows_val // 2  # counted in pairs
    stats.rows_used = stats.rows_train + stats.rows_val
    return train, val, stats


def pair_rows(pairs) -> np.ndarray:
    """Data set rows of the given pair indices, in order: 2k, 2k+1 for each k."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)


def split_pairs(full: TokenizedDataset, val_size: float, seed: int):
    """(train, val) with `val_size` pairs (fraction < 1 or count >= 1) picked by a seeded permutation of the pairs."""
    if not val_size:
        return full, None
    train, val = split_indices(len(full) // 2, val_size, seed, "pair")
    return full.subset(pair_rows(train)), full.subset(pair_rows(val))


def _tokenized_pairs(path, data_cfg, tokenizer, cache_dir, stats: DataStats):
    """TokenizedDataset of one source's pairs (from the cache when possible) and its meta dict."""
    src = None
    fp = source_fingerprint(path) if cache_dir else None
    if cache_dir and fp is None:  # a hub data set: its fingerprint is known only after loading
        src = read_rows(path, data_cfg.split, data_cfg.num_rows)
        fp = src.fingerprint
    target = _cache_target(cache_dir, fp, data_cfg, tokenizer) if fp else None
    hit = cache.load(target) if target else None
    if hit is not None:
        stats.cache_hit, stats.cache_path = True, str(target)
        return TokenizedDataset.from_arrays(hit[0]), hit[1]
    src = src or read_rows(path, data_cfg.split, data_cfg.num_rows)
    pairs, dropped = read_pairs(src, data_cfg.fields, data_cfg.system_prompt)
    template = resolve_pair_template(data_cfg.template, tokenizer, src.rows)
    index = [i for i, p in enumerate(pairs) if p is not None]
    encoded, fixes = encode_pairs(
        [pairs[i] for i in index], tokenizer, template, data_cfg.prompt_format, lambda k: src.where(index[k])
    )
    out = keep_rows(encoded, data_cfg.max_length, True, template)
    kept_rows = set(out.rows)
    keep = [k for k in range(len(index)) if 2 * k in kept_rows and 2 * k + 1 in kept_rows]
    for k in sorted(set(range(len(index))) - set(keep)):
        reason = next(r for r, rows in out.dropped.items() if 2 * k in rows or 2 * k + 1 in rows)
        dropped.setdefault(DROP_PROMPT if reason == DROP_TRUNCATED else reason, []).append(index[k])
    position = {r: j for j, r in enumerate(out.rows)}
    rows = [position[r] for k in keep for r in (2 * k, 2 * k + 1)]
    _check_usable(len(keep), len(src.rows), dropped, data_cfg.max_length, out.longest_prompt, src.name)
    ds = _from_lists(
        [out.input_ids[j] for j in rows], [out.labels[j] for j in rows], [index[k] for k in keep for _ in (0, 1)]
    )
    meta = {
        "source": src.name,
        "template": template,
        "rows_read": len(src.rows),
        "truncated": out.truncated,
        "longest_prompt": out.longest_prompt,
        "longest_row": out.longest_row,
        "boundary_fixes": fixes,
        "dropped": {k: len(v) for k, v in dropped.items()},
        "dropped_examples": {k: [src.where(i) for i in sorted(v)[:5]] for k, v in dropped.items()},
    }
    if target is not None:
        cache.save(target, ds.as_arrays(), meta)
        stats.cache_path = str(target)
    return ds, meta


def _cache_target(cache_dir, fingerprint: str, data_cfg, tokenizer):
    # prompt_format changes preference tokens only, so it joins this key rather than every SFT key
    key = cache.cache_key(
        f"{fingerprint}|{data_cfg.prompt_format}", data_cfg, data_cfg.template, cache.tokenizer_fingerprint(tokenizer)
    )
    return cache.cache_file(cache_dir, key)


def _check_usable(kept: int, n_rows: int, dropped: dict, max_length: int, longest_prompt: int, name: str) -> None:
    if kept:
        return
    reasons = "; ".join(f"{len(v)} pairs: {k}" for k, v in dropped.items())
    raise DataError(
        f"no usable preference pair: all {n_rows} rows of {name} were dropped ({reasons}).",
        (
            f"increase data.max_length (now {max_length}; the longest prompt is {longest_prompt} tokens) or "
            "shorten the prompts"
            if DROP_PROMPT in dropped
            else "check data.fields: each row needs a prompt and two different, non-empty responses"
        )
        + "; `lorafuse data preview` shows how rows are read.",
    )

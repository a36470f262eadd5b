"""`build_datasets`: data config + tokenizer -> tokenized train/validation sets and `DataStats`.

Pipeline: read rows (readers.py) -> rows to samples (formats.py) -> token ids and labels (tokenize.py), with the
result cached on disk (cache.py) -> validation split -> `TokenizedDataset`s.

`TokenizedDataset` keeps every row's tokens in two flat int32 arrays (input_ids, labels) with int64 offsets:
row r is [offsets[r], offsets[r+1]). `ds[r]` gives `{"input_ids": list[int], "labels": list[int]}` (labels -100 =
not trained; not shifted; see tokenize.py).

Validation: `data.val_path` (a separate source, same settings), else `data.val_size` rows taken from the kept rows:
a fraction (0 < v < 1, at least one row) or a count (v >= 1). The pick is a permutation drawn from
`numpy.random.default_rng(seed)`, so it depends only on the data, the settings and the seed.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from lorafuse.data import cache
from lorafuse.data.formats import check_format, default_template, format_rows
from lorafuse.data.readers import demo_data_path, read_rows, source_fingerprint  # noqa: F401 (re-exported)
from lorafuse.data.stats import DataStats, length_histogram
from lorafuse.data.tokenize import DROP_TRUNCATED, tokenize_samples
from lorafuse.errors import DataError


class TokenizedDataset:
    """Tokenized rows in flat arrays; `rows` holds each example's row index in its source."""

    pairs = False  # preference pairs (lorafuse.data.preference): rows 2k, 2k+1 are pair k, batched as pairs
    ref_logps = None  # (rows,) float32 precomputed DPO reference log-probs, handed to the batches (data/collate.py)

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rows: np.ndarray):
        self.input_ids, self.labels, self.offsets, self.rows = input_ids, labels, offsets, rows

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> TokenizedDataset:
        return cls(a["input_ids"], a["labels"], a["offsets"], a["rows"])

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "labels": self.labels, "offsets": self.offsets, "rows": self.rows}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.arrays(i)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[lo:hi], self.labels[lo:hi]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != -100).sum())

    def subset(self, indices) -> TokenizedDataset:
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices])
            if len(indices)
            else np.zeros(0, dtype=np.int64)
        )
        return TokenizedDataset(self.input_ids[take], self.labels[take], offsets, self.rows[indices])


def resolve_template(data_cfg, tokenizer) -> str:
    """ "plain" or "chat". auto: chat for sharegpt/messages when the tokenizer has a chat template, else plain."""
    template = data_cfg.template
    if template not in ("auto", "chat", "plain"):
        raise DataError(f"unknown data.template '{template}'.", "set data.template to auto, chat or plain.")
    if template == "auto":
        template = default_template(data_cfg.format)
        if template == "chat" and getattr(tokenizer, "chat_template", None) is None:
            template = "plain"  # a base model's tokenizer: render turns with the plain template instead
    return template


def cache_dir_for(run_cfg) -> Path:
    """The tokenization cache folder of a RunConfig: data.cache_dir, else <output.dir>/.cache."""
    return Path(run_cfg.data.cache_dir) if run_cfg.data.cache_dir else Path(run_cfg.output.dir) / ".cache"


def build_datasets(data_cfg, tokenizer, seed: int = 42, cache_dir: str | Path | None = None):
    """(train, val or None, DataStats) for `data_cfg` (a lorafuse.config.DataConfig)."""
    if data_cfg.format == "preference":  # pairs for DPO/ORPO: two rows per pair, split by pair
        from lorafuse.data.preference import build_preference_datasets

        return build_preference_datasets(data_cfg, tokenizer, seed, cache_dir)
    check_format(data_cfg.format)
    template = resolve_template(data_cfg, tokenizer)
    cache_dir = cache_dir if cache_dir is not None else data_cfg.cache_dir
    if cache_dir:
        cache.check_dir(cache_dir)
    stats = DataStats(format=data_cfg.format, template=template, max_length=data_cfg.max_length)
    full, meta = _tokenized(data_cfg.path, data_cfg, tokenizer, template, cache_dir, stats)
    metas = [meta]
    if data_cfg.val_path:
        if data_cfg.val_size:
            raise DataError(
                "both data.val_path and data.val_size are set.",
                "keep one: data.val_path for a separate file, or data.val_size to split off rows.",
            )
        train, (val, val_meta) = (
            full,
            _tokenized(data_cfg.val_path, data_cfg, tokenizer, template, cache_dir, DataStats(), "data.val_path"),
        )
        metas.append(val_meta)
    else:
        train, val = split_validation(full, data_cfg.val_size, seed)
    _fill_stats(stats, [train] + ([val] if val is not None else []), metas)
    return train, val, stats


def check_rows(data_cfg) -> None:
    """The checks that need no tokenizer: each local source exists, parses, and every row has the fields of
    data.format (preference: a prompt, chosen and rejected; DataError naming the file and row). Hub data sets are
    left to build_datasets (a download)."""
    pairs = data_cfg.format == "preference"
    if not pairs:
        check_format(data_cfg.format)
    template = "plain" if data_cfg.template == "auto" else data_cfg.template
    for key, path in (("data.path", data_cfg.path), ("data.val_path", data_cfg.val_path)):
        if path and source_fingerprint(path) is not None:
            src = read_rows(path, data_cfg.split, data_cfg.num_rows, key)
            if pairs:
                from lorafuse.data.preference import read_pairs

                read_pairs(src, data_cfg.fields, data_cfg.system_prompt)
            else:
                format_rows(src, data_cfg.format, data_cfg.fields, template, data_cfg.system_prompt)


def _fill_stats(stats: DataStats, parts: list[TokenizedDataset], metas: list[dict]) -> None:
    stats.source = " + ".join(m["source"] for m in metas)
    stats.rows_read = sum(m["rows_read"] for m in metas)
    stats.rows_train, stats.rows_val = len(parts[0]), sum(len(p) for p in parts[1:])
    stats.rows_used = stats.rows_train + stats.rows_val
    stats.tokens_total = sum(p.num_tokens for p in parts)
    stats.target_tokens = sum(p.num_target_tokens for p in parts)
    stats.histogram = length_histogram(np.concatenate([p.lengths for p in parts]).tolist())
    for k in ("truncated", "boundary_fixes"):
        setattr(stats, k, sum(m[k] for m in metas))
    stats.empty_targets = sum(m.get("empty_targets", 0) for m in metas)
    stats.empty_where = [w for m in metas for w in m.get("empty_examples", [])]
    for k in ("longest_prompt", "longest_row"):
        setattr(stats, k, max(m[k] for m in metas))
    for m in metas:
        for reason, n in m["dropped"].items():
            stats.dropped[reason] = stats.dropped.get(reason, 0) + n
            stats.dropped_where.setdefault(reason, []).extend(m["dropped_examples"][reason])


def split_validation(full: TokenizedDataset, val_size: float, seed: int):
    """(train, val) with `val_size` rows (fraction < 1 or count >= 1) picked by a seeded permutation."""
    if not val_size:
        return full, None
    train, val = split_indices(len(full), val_size, seed, "row")
    return full.subset(train), full.subset(val)


def split_indices(n: int, val_size: float, seed: int, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of n units (rows, pairs), each sorted: `val_size` of them (fraction < 1 or count >= 1)
    picked by a seeded permutation for validation, the rest for training."""
    n_val = max(1, int(round(val_size * n))) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise DataError(
            f"data.val_size={val_size} takes {n_val} of the {n} usable {unit}s, leaving none to train on.",
            f"use a smaller data.val_size (a fraction like 0.05, or a {unit} count below the {unit} count).",
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _tokenized(path, data_cfg, tokenizer, template, cache_dir, stats: DataStats, key: str = "data.path"):
    """TokenizedDataset of one source (from the cache when possible) and its meta dict."""
    tok_fp = cache.tokenizer_fingerprint(tokenizer) if cache_dir else None
    fp = source_fingerprint(path) if cache_dir else None
    target = cache.cache_file(cache_dir, cache.cache_key(fp, data_cfg, template, tok_fp)) if fp else None
    hit = cache.load(target) if target else None
    if hit is None:
        src = read_rows(path, data_cfg.split, data_cfg.num_rows, key)
        if cache_dir and target is None:  # a hub data set: its fingerprint is known only after loading
            target = cache.cache_file(cache_dir, cache.cache_key(src.fingerprint, data_cfg, template, tok_fp))
            hit = cache.load(target)
    if hit is not None:
        stats.cache_hit, stats.cache_path = True, str(target)
        return TokenizedDataset.from_arrays(hit[0]), hit[1]
    samples = format_rows(src, data_cfg.format, data_cfg.fields, template, data_cfg.system_prompt)
    out = tokenize_samples(samples, tokenizer, template, data_cfg.max_length, data_cfg.completion_only, src.where)
    _check_usable(out, len(src.rows), data_cfg.max_length, src.name, src.where)
    meta = {
        "source": src.name,
        "rows_read": len(src.rows),
        "truncated": out.truncated,
        "longest_prompt": out.longest_prompt,
        "longest_row": out.longest_row,
        "boundary_fixes": out.boundary_fixes,
        "empty_targets": len(out.empty_targets),
        "empty_examples": [src.where(i) for i in out.empty_targets[:5]],
        "dropped": {k: len(v) for k, v in out.dropped.items()},
        "dropped_examples": {k: [src.where(i) for i in v[:5]] for k, v in out.dropped.items()},
    }
    ds = _from_lists(out.input_ids, out.labels, out.rows)
    if target is not None:
        cache.save(target, ds.as_arrays(), meta)
        stats.cache_path = str(target)
    return ds, meta


def _from_lists(input_ids, labels, rows) -> TokenizedDataset:
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    offsets = np.zeros(len(input_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    flat = itertools.chain.from_iterable
    return TokenizedDataset(
        np.fromiter(flat(input_ids), dtype=np.int32, count=n),
        np.fromiter(flat(labels), dtype=np.int32, count=n),
        offsets,
        np.asarray(rows, dtype=np.int64),
    )


def _check_usable(out, n_rows: int, max_length: int, name: str, where) -> None:
    if not out.input_ids:
        reasons = "; ".join(f"{len(v)} rows: {k}" for k, v in out.dropped.items())
        cut = DROP_TRUNCATED in out.dropped
        raise DataError(
            f"every target is masked: all {n_rows} rows of {name} were dropped ({reasons}).",
            (
                f"increase data.max_length (now {max_length}; the longest prompt is {out.longest_prompt} tokens) "
                "or shorten the prompts"
                if cut
                else "check data.format and data.fields (each row needs a target: an output/response/completion or an "
                "assistant turn)"
            )
            + ", or set data.completion_only=false to train on every token.",
        )
    if len(out.empty_targets) == len(out.input_ids):
        raise DataError(
            f"no row of {name} has an answer to train on: every trained target is only the end-of-text token "
            f"(the answer fields are empty, e.g. {where(out.empty_targets[0])}).",
            "fill in the answers, map the answer column with data.fields (e.g. data.fields.output=answer), or set "
            "data.completion_only=false to train on the whole text.",
        )
    if out.shortest_row > max_length:
        raise DataError(
            f"every row of {name} is longer than data.max_length={max_length} tokens "
            f"(the shortest is {out.shortest_row}, the longest {out.longest_row}).",
            f"increase data.max_length to at least {out.shortest_row} (better: about {out.longest_row}), "
            "or shorten the rows.",
        )

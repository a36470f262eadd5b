"""On-disk cache of tokenized rows, so a second run (or a resumed one) skips tokenization.

Key = SHA-256 over: the source fingerprint (file bytes hash, folder listing or hub fingerprint), the data settings
that change tokens (format, fields, template, system_prompt, completion_only, max_length, split, num_rows), a
fingerprint of the tokenizer (its full tokenizer.json, or its vocabulary when it has no fast backend, plus the chat
template and special-token ids), and `CACHE_VERSION` (bumped whenever tokenize.py changes its output).

File: `<cache_dir>/tokens-<key[:32]>.npz`, no pickle inside (loaded with allow_pickle=False):
  input_ids int32 (N,), labels int32 (N,), offsets int64 (R+1,), rows int64 (R,), meta uint8 (JSON bytes).
Row r is input_ids[offsets[r]:offsets[r+1]]. Written to a temporary file in the same folder, then renamed, so a
crash never leaves a half-written cache file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lorafuse.errors import DataError
from lorafuse.io_errors import writing

CACHE_VERSION = 1
_KEY_FIELDS = ("format", "fields", "template", "system_prompt", "completion_only", "max_length", "split", "num_rows")


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    extra = (
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    h.update(repr(extra).encode())
    return h.hexdigest()


def cache_key(source_fingerprint: str, data_cfg, template: str, tokenizer_fp: str) -> str:
    settings = {k: getattr(data_cfg, k, None) for k in _KEY_FIELDS}
    settings["template"] = template  # the resolved one ("auto" may mean either)
    blob = json.dumps(
        [CACHE_VERSION, source_fingerprint, settings, tokenizer_fp], sort_keys=True, ensure_ascii=False, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_file(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"tokens-{key[:32]}.npz"


def check_dir(cache_dir: str | Path) -> None:
    """The cache folder is a folder, or can be made (no file on its path): DataError before any work."""
    folder = Path(cache_dir)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(
            f"the tokenization cache folder {folder} cannot be used: {blocker} is a file, not a folder",
            "set data.cache_dir to a folder (null: <output.dir>/.cache)",
        )


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write `arrays` (input_ids, labels, offsets, rows) and `meta` atomically to `path`."""
    arrays = dict(arrays, meta=np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path, setting="data.cache_dir"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta), or None when the file is missing or unreadable (then the caller rebuilds it)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("input_ids", "labels", "offsets", "rows")}
            meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError):
        return None
    return arrays, meta


def tokens_fingerprint(*datasets) -> str:
    """sha256 of the tokenized rows (input ids, labels, row bounds) of each data set, in order; None ones skipped."""
    h = hashlib.sha256()
    for ds in datasets:
        for name, array in sorted(ds.as_arrays().items()) if ds is not None else ():
            h.update(name.encode())
            h.update(array.tobytes())
    return h.hexdigest()

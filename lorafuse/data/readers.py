"""Read a data source into a list of row dicts, with errors that say how to fix the file.

Sources (`data.path`):
  * `builtin:demo`                  -> the bundled sample `lorafuse/data/samples/demo.jsonl`
  * `*.jsonl` / `*.ndjson`          -> one JSON object per line (blank lines skipped)
  * `*.json`                        -> a list of row objects, or an object holding that list under the split name
                                       (`{"train": [...]}`) or under `"data"` (`{"data": [...]}`). A `.json` file
                                       that is really JSON Lines is read as JSON Lines.
  * `*.csv` / `*.tsv`               -> a header row, then one row per line (all values are strings)
  * `*.parquet`                     -> read with pyarrow
  * a folder written by `datasets`' `save_to_disk` (Dataset or DatasetDict; `data.split` picks the split)
  * anything else that looks like `owner/name` -> `datasets.load_dataset(name, split=data.split)` (needs the network
    or the local HF cache)

Text files must be UTF-8 (a UTF-8 BOM is accepted). `RowSource.fingerprint` identifies the content for the
tokenization cache: a SHA-256 of the file bytes, of a folder's (name, size, mtime) listing, or the `datasets`
fingerprint of a hub data set.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorafuse import builtin
from lorafuse.errors import DataError
from lorafuse.io_errors import reading

_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def demo_data_path() -> Path:
    """The bundled bilingual (Japanese/English) instruction sample, alpaca fields."""
    return builtin.data_path("demo")


@dataclass
class RowSource:
    """Rows read from one source. `where(i)` names row i for error messages ("line 12 of a.jsonl")."""

    rows: list[dict]
    name: str
    fingerprint: str
    line_numbers: list[int] | None = None  # JSON Lines: the file line of each row

    def where(self, i: int) -> str:
        if self.line_numbers is not None:
            return f"line {self.line_numbers[i]} of {self.name}"
        return f"row {i + 1} of {self.name}"


def read_rows(path: str, split: str = "train", num_rows: int | None = None, key: str = "data.path") -> RowSource:
    """Read `path` (see the module docstring) into rows; keep the first `num_rows` when given.

    `key` names the config key the path came from (data.path or data.val_path), for the messages."""
    src = _read_any(str(path), split, key)
    if not src.rows:
        raise DataError(f"{src.name} holds no rows.", "point data.path at a file with at least one example.")
    if num_rows is not None:
        src.rows = src.rows[: int(num_rows)]
        if src.line_numbers is not None:
            src.line_numbers = src.line_numbers[: int(num_rows)]
    return src


def source_fingerprint(path: str) -> str | None:
    """The fingerprint `read_rows(path).fingerprint` will have, without parsing; None for hub data sets."""
    p = _local_path(str(path))
    if p.is_file():
        return "sha256:" + _file_sha256(p)
    if p.is_dir():
        return _folder_fingerprint(p)
    return None


def _local_path(path: str) -> Path:
    """A bundled data set's file (builtin:<name>, lorafuse.builtin), else the path as given."""
    bundled = builtin.data_path(path) if path.startswith(builtin.PREFIX) else None
    return bundled or Path(path).expanduser()


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _folder_fingerprint(p: Path) -> str:
    listing = sorted(
        (str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()
    )
    return "folder:" + hashlib.sha256(repr(listing).encode()).hexdigest()


def _read_any(path: str, split: str, key: str = "data.path") -> RowSource:
    p = _local_path(path)
    if p.is_dir():
        return _read_saved_dataset(p, split)
    if p.is_file():
        return _read_file(p, split)
    if p.suffix.lower() in _SUFFIXES or not _HUB_NAME.match(path) or path.startswith(("builtin:", ".")):
        raise DataError(
            f"data file not found ({key}): {path} (resolved to {p.resolve()}; the current directory is {Path.cwd()}).",
            f"check {key}: a relative path is read from the current directory; use an absolute path"
            + (
                f", or one of the bundled samples: {', '.join(builtin.PREFIX + n for n in builtin.DATA_SETS)}."
                if key == "data.path"
                else "."
            ),
        )
    return _read_hub(path, split)


def _read_file(p: Path, split: str) -> RowSource:
    raw = p.read_bytes()
    fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return RowSource(_parquet_rows(p, raw), str(p), fingerprint)
    text = _decode(raw, p)
    if not text.strip():
        raise DataError(f"data file is empty: {p}", "fill it with examples (one JSON object per line for .jsonl).")
    if suffix in (".csv", ".tsv"):
        return RowSource(_csv_rows(text, "\t" if suffix == ".tsv" else ","), str(p), fingerprint)
    if suffix == ".json":
        rows = _json_rows(text, p, split)
        if rows is not None:
            return RowSource(rows, str(p), fingerprint)
    if suffix not in (".json", ".jsonl", ".ndjson"):
        raise DataError(
            f"unknown data file type '{p.suffix}': {p}",
            "use .jsonl, .json, .csv, .tsv or .parquet (rename the file if its content is one of these).",
        )
    rows, lines = _jsonl_rows(text, p)
    return RowSource(rows, str(p), fingerprint, lines)


def _decode(raw: bytes, p: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        lo = raw.rfind(b"\n", 0, e.start) + 1
        hi = raw.find(b"\n", e.start)
        bad_line = raw[lo : hi if hi >= 0 else len(raw)]  # guess the encoding from the offending line only
        enc = next((enc for enc in ("cp932", "euc_jp") if _decodes(bad_line, enc)), None)
        guess = f" It decodes as {enc}, so it was probably saved in that encoding." if enc else ""
        raise DataError(
            f"{p} is not UTF-8 text: byte offset {e.start} (line {line}) holds {raw[e.start : e.start + 4]!r}.{guess}",
            f"re-encode the file as UTF-8, e.g. `iconv -f {enc or 'SHIFT_JIS'} -t UTF-8 {p.name} > "
            f"{p.stem}.utf8{p.suffix}`, or save it as 'UTF-8' in your editor.",
        ) from None


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def _jsonl_rows(text: str, p: Path) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"malformed JSON at line {n} of {p} (column {e.colno}: {e.msg}); the line starts: {line[:80]!r}",
                "fix that line: each line of a .jsonl file must be one complete JSON object, "
                'e.g. {"instruction": "...", "input": "", "output": "..."}.',
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"line {n} of {p} is a JSON {type(row).__name__}, not an object: {line[:80]!r}",
                "write one JSON object per line, with the fields of your data.format.",
            )
        rows.append(row)
        lines.append(n)
    return rows, lines


def _json_rows(text: str, p: Path, split: str) -> list[dict] | None:
    """Rows of a .json file; None when the file is really JSON Lines (several values, one per line)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return None
        line = text.splitlines()[e.lineno - 1] if e.lineno - 1 < len(text.splitlines()) else ""
        raise DataError(
            f"malformed JSON at line {e.lineno} of {p} (column {e.colno}: {e.msg}); the line starts: {line[:80]!r}",
            "fix the JSON there (a .json file holds one JSON list of row objects), "
            "or save one object per line as .jsonl.",
        ) from None
    if isinstance(data, dict):
        key = split if isinstance(data.get(split), list) else "data" if isinstance(data.get("data"), list) else None
        if key is None:
            raise DataError(
                f"{p} holds a JSON object with keys {sorted(data)[:10]}, not a list of rows.",
                f'write a JSON list of rows, or put the list under "{split}" (data.split) or "data".',
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(
            f"{p} holds a JSON {type(data).__name__}, not a list of rows.",
            "write a JSON list of row objects, or one object per line as .jsonl.",
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(
                f"row {i + 1} of {p} is a JSON {type(row).__name__}, not an object: {str(row)[:80]!r}",
                "every row must be a JSON object with the fields of your data.format.",
            )
    return data


def _csv_rows(text: str, delimiter: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [dict(r) for r in reader]


def _parquet_rows(p: Path, raw: bytes) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not raw:
        raise DataError(f"data file is empty: {p}", "write the Parquet file again; it has zero bytes.")
    try:
        return pq.read_table(pa.BufferReader(raw)).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(
            f"{p} is not a readable Parquet file: {e}",
            "write it again with pandas/pyarrow `to_parquet`, or convert it to .jsonl.",
        ) from None


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading {what} needs the `datasets` package, which is not installed.",
            "pip install 'lorafuse[hub]' (or pip install datasets), or pass a .jsonl/.json/.csv/.parquet "
            "file as data.path.",
        ) from None
    return datasets


def _read_saved_dataset(p: Path, split: str) -> RowSource:
    if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        raise DataError(
            f"{p} is a folder but not a `datasets` save_to_disk folder (no dataset_info.json or dataset_dict.json).",
            "point data.path at a data file inside it (.jsonl, .json, .csv, .parquet), or save the data set with "
            "`Dataset.save_to_disk(folder)`.",
        )
    datasets = _import_datasets(f"the folder {p}")
    with reading(p, "the saved data set", DataError, fix="save it again with `Dataset.save_to_disk(folder)`"):
        ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p} has splits {list(ds)}, not '{split}'.", f"set data.split to one of {list(ds)}.")
        ds = ds[split]
    return RowSource(ds.to_list(), str(p), _folder_fingerprint(p))


def _read_hub(name: str, split: str) -> RowSource:
    datasets = _import_datasets(f"the hub data set '{name}'")
    from lorafuse.hub import dataset_online, datasets_offline

    online = dataset_online(name)  # offline and not cached: the error at once, no retries
    try:
        with contextlib.nullcontext() if online else datasets_offline():
            ds = datasets.load_dataset(name, split=split)
    except ConnectionError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise DataError(
            f"'{name}' is not a local file, and the Hugging Face Hub cannot be reached to download it"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {e}",
            "pass a local file: data.path=path/to/train.jsonl (JSONL, JSON, CSV, Parquet or a `save_to_disk` "
            "folder), or run once with network access so the data set is in the local cache.",
        ) from None
    except (FileNotFoundError, ValueError) as e:
        raise DataError(
            f"cannot load '{name}' (not a local file; as a hub data set: {e})",
            "check the spelling of data.path and data.split, or pass a local file.",
        ) from None
    return RowSource(ds.to_list(), f"hub:{name}[{split}]", "hub:" + ds._fingerprint)

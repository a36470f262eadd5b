"""A checkpoint's manifest, and the check that a checkpoint is intact before it is trusted.

`checkpoint-N/manifest.json` is written last, after every other file of the checkpoint (and before the folder gets
its final name):

    {"format": 1, "step": N, "files": {"<path relative to the folder>": {"size": bytes, "sha256": hex}, ...}}

`verify(folder)` returns None for an intact checkpoint, else one short reason ("optimizer.pt is missing",
"trainable.safetensors is 1024 bytes, its manifest says 4096", "rng.pt does not match its sha256"). With a
manifest: every file the loop needs is listed, every listed file exists with its size (checked for all files
first, cheap) and its sha256. A checkpoint written before manifests existed is verified as far as its own formats
allow: the files the loop needs exist, trainer_state.json is a JSON object whose step is N, each safetensors
file's header parses and its tensors end exactly at the file's end, and each torch.save zip archive passes its
CRC-32 check (zipfile.testzip: nothing is unpickled). A checkpoint missing a file is corrupt, never partly used.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
STATE_FILES = ("trainable.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, step: int) -> Path:
    """List every file under `folder` with its size and sha256, then write manifest.json atomically."""
    from lorafuse.atomic import write_atomic

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    blob = json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1)
    return write_atomic(folder / MANIFEST, blob)


def verify(folder: Path) -> str | None:
    """None when `folder` is an intact checkpoint, else why it is not (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    why = _against_manifest(folder) if (folder / MANIFEST).exists() else _legacy(folder)
    return why or _state_step(folder)


def _against_manifest(folder: Path) -> str | None:
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = {name: (int(v["size"]), str(v["sha256"])) for name, v in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name in STATE_FILES:
        if name not in entries:
            return f"{name} is not in its {MANIFEST}"
    for name, (size, _) in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, its manifest says {size} (truncated or overwritten)"
    for name, (_, digest) in entries.items():
        if _sha256(folder / name) != digest:
            return f"{name} does not match its sha256 in {MANIFEST} (the file changed after it was written)"
    return None


def _legacy(folder: Path) -> str | None:
    """What can be checked without a manifest (module docstring)."""
    for name in STATE_FILES:
        if not (folder / name).is_file():
            return f"{name} is missing"
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".safetensors" and not _safetensors_whole(path):
            return f"{name} is not a complete safetensors file"
        if path.suffix == ".pt" and not _zip_whole(path):
            return f"{name} is not a complete torch.save archive"
        if path.suffix == ".json" and not _json_ok(path):
            return f"{name} is not valid JSON"
    return None


def _state_step(folder: Path) -> str | None:
    """trainer_state.json must be a JSON object whose step is the N of checkpoint-N."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    expected = folder.name.removeprefix("checkpoint-")
    if not isinstance(state, dict) or str(state.get("step")) != expected:
        return f"trainer_state.json does not hold step {expected}"
    return None


def _safetensors_whole(path: Path) -> bool:
    """The 8-byte header length, a JSON header, and tensors whose data ends exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return False


def _zip_whole(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def _json_ok(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True

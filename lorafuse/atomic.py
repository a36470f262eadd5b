"""All-or-nothing writes: a crash, SIGKILL or full disk never leaves a half-written file or folder.

`write_atomic(path, data)`: write a temp file beside `path`, fsync it, rename it over `path`, fsync the folder. A rename
is atomic because the temp lives on the same filesystem as the target; fsyncing the parent folder makes the rename
itself durable. `fsync_path` / `fsync_tree` make a file's or a folder tree's contents durable. `normal_file_modes`
gives the files of a folder the mode a plain open() gives (safetensors writes 0600). `process_running(pid)` tells
whether the process that wrote a lock or a temp folder still runs, before its leftovers are taken as stale.

Used for configs, metrics, plots, the token cache, bnb 4-bit folders and checkpoints; a whole output folder (an
adapter, a merged model) is written with `lorafuse.outputs.atomic_folder`, which builds on these.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse.io_errors import write_error


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def normal_file_modes(root: str | Path) -> None:
    """Every file under `root` gets the mode a plain open() gives it (0666 less the umask: 0644 as a rule).
    safetensors writes its files 0600, so without this an adapter's or a model's weights alone would be unreadable
    to the rest of a group sharing them."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~umask)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` through a temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        converted = write_error(exc, path) if isinstance(exc, OSError) else None
        if converted is not None:  # disk full, read-only, no permission: named with the file, not its temp
            raise converted from exc
        raise
    fsync_path(path.parent)
    return path


def process_running(pid: int | None) -> bool:
    """Whether a process with this pid runs (one of another user's counts); False for no pid."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

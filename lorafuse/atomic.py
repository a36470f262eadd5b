"""All-or-nothing writes: a crash, SIGKILL or full disk never leaves a half-written file or folder.

`write_atomic(path, data)`: write a temp file beside `path`, fsync it, rename it over `path`, fsync the folder.
`atomic_folder(path, kind)`: a context manager yielding a temp folder beside `path`; on normal exit the folder gets
its `.lorafuse` marker (kind + the names written, lorafuse.outputs), every file and folder in it is fsynced and it takes
`path`'s place (an existing folder is swapped out in one renameat2(RENAME_EXCHANGE) where Linux has it, else renamed
aside first and then deleted), so readers see the old folder or the complete new one. On an exception the temp folder
is removed and `path` is left untouched. Files get the mode a plain open() gives (`normal_file_modes`). Renames are
atomic because the temp lives on the same filesystem as the target; fsyncing the parent folder makes the rename
itself durable.

An existing `path` is replaced only when it is empty or an earlier output of the same kind holding nothing but what
its marker lists (`lorafuse.outputs.check_replaceable`, checked before the body runs and again before the swap): a
folder lorafuse did not write, or another kind of output (a run, an adapter, a model), can never be swapped out.

Used for configs, metrics, plots, the token cache, bnb 4-bit folders, adapters, merged models and checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.io_errors import write_error
from lorafuse.outputs import check_replaceable, mark_written


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


@contextlib.contextmanager
def atomic_folder(path: str | Path, kind: str):
    """`with atomic_folder(out, "merge") as tmp: <write files into tmp>` replaces `out` only once everything is
    written, and only when `out` is absent, empty or an earlier `kind` output (module docstring)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise LorafuseError(f"{path} exists and is a file, not a folder", "choose another output path or remove it")
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like a normal folder
    try:
        yield tmp
        mark_written(tmp, kind)
        normal_file_modes(tmp)
        fsync_tree(tmp)
        check_replaceable(path, kind)  # again: the folder may have changed while the body wrote
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0

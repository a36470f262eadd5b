"""Library exceptions turned into a `LorafuseError` that names the file and the fix.

safetensors, torch, tokenizers, pickle, json and yaml each raise their own type when a file is corrupt or a disk
is full, and most leave the path out of the message. The places that read and write files therefore wrap the call,
where the path and its meaning are known:

    with reading(path, "the adapter's weights", ModelError, fix="save the adapter again"):
        tensors = load_file(path)          # corrupt, truncated, a pickle refused by safe loading, not JSON, ...
    with writing(path, setting="output.dir"):
        save_file(tensors, path)           # disk full, quota, read-only file system, no permission

`translate(exc)` is the CLI's catch-all for what no IO site converted: an OSError that carries a file name, a
MemoryError, a GPU out of memory, and the library types above (then without the file). It returns None for
anything else, which the CLI reports as a bug.

IO failures are recognised by errno: `OSError.errno`, or the "(os error N)" that the Rust libraries (safetensors,
tokenizers) write into the message of their own exception types. torch.save given a path reports a full disk
without an errno ("unexpected pos"), so lorafuse hands it an open Python file instead (`save_torch`), whose writes
raise OSError(ENOSPC).
"""

from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path

from lorafuse.errors import LorafuseError

_RUST_ERRNO = re.compile(r"\(os error (\d+)\)")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)
_TORCH_ARCHIVE = ("PytorchStreamReader", "zip archive", "central directory")
OOM_FIX = (
    "lower train.micro_batch_size or data.max_length, use model.quant=nf4 or a smaller model, or close other "
    "programs; `lorafuse plan`, given the run's config file, estimates the memory a run needs"
)


def io_errno(exc: BaseException) -> int | None:
    """The errno of an IO failure, whichever library raised it; None when there is none."""
    if isinstance(exc, LorafuseError):  # converted at an inner IO site: the cause it was raised from tells
        return io_errno(exc.__cause__) if exc.__cause__ is not None else None
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    m = _RUST_ERRNO.search(str(exc))
    return int(m.group(1)) if m else None


def _names(exc: BaseException) -> set[str]:
    """Class names along the exception's MRO (library types are matched by name: no import of torch here)."""
    return {c.__name__ for c in type(exc).__mro__}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_error(exc: BaseException, path, setting: str = "output.dir") -> LorafuseError | None:
    """The user's error for a failed write of `path` (`setting` names the option that chose the folder)."""
    code = io_errno(exc)
    if code in _DISK_FULL:
        what = "the disk quota is used up" if code == errno.EDQUOT else "the disk is full"
        return LorafuseError(f"{what}: {path}", f"free space or point {setting} elsewhere")
    if code == errno.EROFS:
        return LorafuseError(f"the file system is read-only: {path}", f"point {setting} at a folder on a writable disk")
    if code in (errno.EACCES, errno.EPERM):
        return LorafuseError(
            f"no permission to write {path}", f"point {setting} at a folder you own, or give yourself write access"
        )
    if code is not None:
        return LorafuseError(
            f"could not write {path}: {_first_line(exc)}",
            f"check the disk and the folder, or point {setting} elsewhere",
        )
    return None


def read_error(exc: BaseException, path, what: str, error=LorafuseError, fix: str | None = None):
    """The user's error for a failed read of `path` (`what` it is, for the message), or None if not an IO fault."""
    names, line = _names(exc), _first_line(exc)
    fix = fix or "replace the file with an intact copy"
    if "SafetensorError" in names:
        return error(f"{what} {path} is not a readable safetensors file (corrupt or truncated: {line})", fix)
    if "UnpicklingError" in names:
        return error(
            f"{what} {path} holds Python objects that safe loading refuses (torch.load weights_only=True); "
            "lorafuse never runs code from a pickle",
            "use a safetensors file, or save plain tensors with torch.save from code you trust",
        )
    torch_archive = isinstance(exc, RuntimeError) and any(k in line for k in _TORCH_ARCHIVE)
    if isinstance(exc, EOFError) or torch_archive:
        return error(f"{what} {path} is corrupt or truncated (torch cannot read it: {line})", fix)
    if "JSONDecodeError" in names:
        return error(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", fix)
    if isinstance(exc, UnicodeDecodeError):
        return error(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})", fix)
    if "YAMLError" in names:
        return error(f"{what} {path} is not valid YAML ({line})", fix)
    if isinstance(exc, OSError):
        return _read_os_error(exc, path, what, error)
    return None


def _read_os_error(exc: OSError, path, what: str, error):
    if exc.errno == errno.ENOENT:
        return error(f"{what} not found: {path}", "check the path, or write the file again")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return error(f"no permission to read {what} {path}", "give yourself read access, or copy the file")
    if exc.errno == errno.EISDIR:
        return error(f"{what} {path} is a folder, not a file", "point at the file inside it")
    return error(f"could not read {what} {path}: {exc.strerror or _first_line(exc)}", "check the file and the disk")


@contextlib.contextmanager
def reading(path, what: str, error=LorafuseError, fix: str | None = None):
    """Convert a library's failure to read `path` into `error` naming the file (see the module docstring)."""
    try:
        yield
    except LorafuseError:
        raise
    except Exception as exc:
        converted = read_error(exc, path, what, error, fix)
        if converted is None:
            raise
        raise converted from exc


@contextlib.contextmanager
def writing(path, setting: str = "output.dir"):
    """Convert a failure to write `path` (disk full, read-only, no permission) into a LorafuseError."""
    try:
        yield
    except LorafuseError:
        raise
    except Exception as exc:
        converted = write_error(exc, path, setting)
        if converted is None:
            raise
        raise converted from exc


def save_torch(obj, path) -> None:
    """torch.save through a Python file, so a full disk raises OSError(ENOSPC) (torch's own writer hides errno)."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def translate(exc: BaseException) -> LorafuseError | None:
    """The CLI's catch-all: a LorafuseError for a known fault no IO site converted, else None (a bug)."""
    names = _names(exc)
    if "OutOfMemoryError" in names:  # torch.OutOfMemoryError: the GPU's memory
        return LorafuseError(f"the GPU ran out of memory ({_first_line(exc)})", OOM_FIX)
    if isinstance(exc, MemoryError):
        return LorafuseError("the computer ran out of memory (host RAM)", OOM_FIX)
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename:
        return write_error(exc, filename) if exc.errno in _DISK_FULL + _NO_WRITE else _os_error(exc)
    if io_errno(exc) in _DISK_FULL:  # a library's write failure that named no file
        return write_error(exc, "a file lorafuse was writing")
    return read_error(exc, "(the file's name was not reported)", "a file")


def _os_error(exc: OSError) -> LorafuseError:
    path = Path(exc.filename)
    hint = {
        errno.ENOENT: "check the path (a relative path is read from the current folder)",
        errno.ENOTDIR: f"a part of {path} is a file where a folder is needed: choose another path",
        errno.EISDIR: f"{path} is a folder where a file is needed: choose another path",
        errno.EEXIST: f"{path} already exists as another kind of entry: choose another path",
    }.get(exc.errno, "check the path and the disk")
    return LorafuseError(f"{exc.strerror or _first_line(exc)}: {path}", hint)

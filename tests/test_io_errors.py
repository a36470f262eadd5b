"""io_errors: library exceptions recognised by errno or type, and the CLI catch-all's mapping."""

from __future__ import annotations

import errno
import json
import os

import pytest
import safetensors

from lorafuse.errors import LorafuseError, ModelError
from lorafuse.io_errors import io_errno, reading, translate, writing


def test_errno_from_oserror_rust_messages_and_converted_causes():
    assert io_errno(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    assert io_errno(Exception("No space left on device (os error 28)")) == errno.ENOSPC  # tokenizers
    assert io_errno(safetensors.SafetensorError("I/O error: Disk quota exceeded (os error 122)")) == errno.EDQUOT
    assert io_errno(RuntimeError("unexpected pos 576 vs 534")) is None
    with pytest.raises(LorafuseError) as err:
        with writing("/x/adapter"):
            raise Exception("No space left on device (os error 28)")
    assert io_errno(err.value) == errno.ENOSPC and str(err.value).startswith("the disk is full: /x/adapter")


def test_reading_converts_known_faults_and_lets_bugs_through(tmp_path):
    with pytest.raises(ModelError, match=r"the config .*c\.json is not valid JSON \(line 1, column 2"):
        with reading(tmp_path / "c.json", "the config", ModelError):
            json.loads("{x")
    with pytest.raises(KeyError):  # not an IO fault: stays the bug it is
        with reading(tmp_path / "c.json", "the config", ModelError):
            {}["missing"]


def test_translate():
    missing = translate(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/data/x.jsonl"))
    assert missing.problem == "No such file or directory: /data/x.jsonl" and "relative path" in missing.fix
    full = translate(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/metrics.jsonl"))
    assert full.problem == "the disk is full: /runs/a/metrics.jsonl"
    assert "ran out of memory" in translate(MemoryError()).problem
    oom = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2 GiB")
    assert translate(oom).problem.startswith("the GPU ran out of memory")
    assert translate(ZeroDivisionError("x")) is None and translate(ValueError("bad")) is None

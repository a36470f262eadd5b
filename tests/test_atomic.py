"""atomic_folder / write_atomic: all or nothing, the old version intact on failure."""

from __future__ import annotations

import os

import pytest

from lorafuse.atomic import atomic_folder, write_atomic
from lorafuse.errors import LorafuseError


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "ckpt"
    umask = os.umask(0o022)
    try:
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("old")
            assert not out.exists(), "nothing is visible before the block ends"
    finally:
        os.umask(umask)
    assert (out / "a.txt").read_text() == "old"
    assert out.stat().st_mode & 0o777 == 0o755, "a normal folder, not mkdtemp's private 0700"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "old"
    with atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "no temporary folders are left behind"


def test_atomic_folder_without_rename_exchange(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing the old folder is renamed aside first: same visible result."""
    from lorafuse import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "ckpt"
    for text in ("old", "new"):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text(text)
    assert (out / "a.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_write_atomic_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    write_atomic(target, "old")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(LorafuseError, match=r"the disk is full: .*config\.yaml\n"):  # the file, not its temp
        write_atomic(target, "new")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["config.yaml"]

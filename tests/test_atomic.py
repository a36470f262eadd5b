"""atomic_folder / write_atomic: all or nothing, the old version intact on failure."""

from __future__ import annotations

import os

import pytest

from lorafuse.atomic import write_atomic
from lorafuse.errors import LorafuseError
from lorafuse.outputs import atomic_folder, read_marker


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "ckpt"
    umask = os.umask(0o022)
    try:
        with atomic_folder(out, "merge") as tmp:
            (tmp / "a.txt").write_text("old")
            assert not out.exists(), "nothing is visible before the block ends"
    finally:
        os.umask(umask)
    assert (out / "a.txt").read_text() == "old"
    assert out.stat().st_mode & 0o777 == 0o755, "a normal folder, not mkdtemp's private 0700"
    with pytest.raises(RuntimeError):
        with atomic_folder(out, "merge") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "old"
    with atomic_folder(out, "merge") as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(os.listdir(out)) == [".lorafuse", "b.txt"]
    assert read_marker(out)["kind"] == "merge" and read_marker(out)["files"] == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "no temporary folders are left behind"


def test_atomic_folder_replaces_only_an_earlier_output_of_its_kind(tmp_path):
    """A folder lorafuse did not write, another kind of output, or one with a file added is never swapped out."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(LorafuseError, match="files lorafuse did not write \\(notes.txt\\)"):
        with atomic_folder(theirs, "merge") as tmp:
            (tmp / "a.txt").write_text("x")
    adapter = tmp_path / "adapter"
    with atomic_folder(adapter, "adapter") as tmp:
        (tmp / "a.txt").write_text("x")
    with pytest.raises(LorafuseError, match="a lorafuse adapter folder"):
        with atomic_folder(adapter, "merge") as tmp:
            pass
    (adapter / "extra.txt").write_text("added by hand")
    with pytest.raises(LorafuseError, match="extra.txt") as err:
        with atomic_folder(adapter, "adapter") as tmp:
            pass
    assert "move those files" in err.value.fix
    assert (theirs / "notes.txt").read_text() == "mine" and (adapter / "extra.txt").is_file()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "theirs"], "refused before any temporary folder is made"


def test_atomic_folder_without_rename_exchange(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing the old folder is renamed aside first: same visible result."""
    from lorafuse import outputs

    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "ckpt"
    for text in ("old", "new"):
        with atomic_folder(out, "merge") as tmp:
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

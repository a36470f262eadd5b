"""Atomic checkpoints: crash and disk-full behaviour, rotation, archive, lock, RNG round trip."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.outputs import ensure_writable_dir
from lorafuse.training import checkpoint as ckpt
from lorafuse.training import rng
from lorafuse.training.manifest import verify


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def _save(out, step, model, opt, **kw):
    return ckpt.save_checkpoint(
        out,
        step,
        model=model,
        optimizer=opt,
        trainer_state={"step": step},
        metrics_jsonl=json.dumps({"step": step}) + "\n",
        **kw,
    )


def test_save_then_load_restores_everything(tmp_path):
    model, opt = _model_and_opt()
    folder = _save(tmp_path, 3, model, opt)
    assert folder.name == "checkpoint-3" and ckpt.latest_checkpoint(tmp_path) == folder
    assert not list(tmp_path.glob("*.tmp-*"))
    model2, opt2 = _model_and_opt()
    with torch.no_grad():
        model2[1].weight.add_(1.0)
    restored = ckpt.load_checkpoint(folder, model=model2, optimizer=opt2)
    assert torch.equal(model2[1].weight, model[1].weight)
    assert restored["trainer_state"] == {"step": 3}
    assert restored["metrics_jsonl"] == '{"step": 3}\n'
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_manifest_lists_every_file_and_verify_catches_a_changed_one(tmp_path):
    model, opt = _model_and_opt()
    folder = _save(tmp_path, 3, model, opt)
    listed = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(listed["files"]) == [n for n in on_disk if n != "manifest.json"] and listed["step"] == 3
    assert verify(folder) is None
    rng = folder / "rng.pt"
    data = bytearray(rng.read_bytes())
    data[-30] ^= 1  # one bit, same size
    rng.write_bytes(bytes(data))
    assert verify(folder) == "rng.pt does not match its sha256 in manifest.json (the file changed after it was written)"
    with pytest.raises(LorafuseError, match="not an intact checkpoint: rng.pt") as err:
        ckpt.load_checkpoint(folder, model=model, optimizer=opt)
    assert "--no-resume" in err.value.fix


def test_newest_intact_skips_damaged_newer_checkpoints(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt)
    (tmp_path / "checkpoint-3" / "optimizer.pt").unlink()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"step": 7}')
    folder, damaged = ckpt.newest_intact(tmp_path)
    assert folder.name == "checkpoint-1"
    assert [(f.name, why.split(" ")[0]) for f, why in damaged] == [
        ("checkpoint-3", "optimizer.pt"),
        ("checkpoint-2", "trainer_state.json"),
    ]
    (tmp_path / "checkpoint-1" / "manifest.json").unlink()  # a legacy checkpoint: its own formats are checked
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text('{"step": 7}')
    assert verify(tmp_path / "checkpoint-1") == "trainer_state.json does not hold step 1"


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    model, opt = _model_and_opt()
    _save(tmp_path, 2, model, opt)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(LorafuseError, match="NaN/inf by step 4 \\(1.weight\\)") as err:
        _save(tmp_path, 4, model, opt)
    assert "lower train.lr" in err.value.fix and "resumes from checkpoint-2" in err.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_trainable_set_mismatch_is_a_clear_error(tmp_path):
    model, opt = _model_and_opt()
    folder = _save(tmp_path, 1, model, opt)
    model[0].weight.requires_grad_(True)
    with pytest.raises(LorafuseError, match="trainable parameters"):
        ckpt.load_checkpoint(folder, model=model, optimizer=opt)


def test_disk_full_keeps_the_previous_checkpoint_and_removes_tmp(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    _save(tmp_path, 2, model, opt)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir() if p.is_file()}
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if getattr(f, "name", str(f)).endswith("rng.pt"):  # mid-checkpoint: tensors and optimizer written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(LorafuseError) as err:
        _save(tmp_path, 4, model, opt)
    assert "disk is full" in str(err.value) and "checkpoint-2 is intact" in str(err.value)
    assert "free disk space" in err.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir() if p.is_file()}
    assert after == before


def test_sigkill_mid_write_leaves_only_a_tmp_folder(tmp_path):
    """A real SIGKILL while files are being written: no checkpoint-N, a tmp folder the next start removes."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from lorafuse.training import checkpoint as ckpt
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        real = ckpt.fsync_tree
        def die(root):  # everything written, nothing renamed yet
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.fsync_tree = die
        ckpt.save_checkpoint({str(tmp_path)!r}, 7, model=model, optimizer=opt, trainer_state={{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 1 and names[0].startswith("checkpoint-7.tmp-"), names
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert [p.name for p in ckpt.clean_stale_tmp(tmp_path)] == names
    assert list(tmp_path.iterdir()) == []


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, model, opt)
        if step == 2:
            ckpt.write_best(tmp_path, 2, 0.5)
        ckpt.rotate(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]


def test_archive_moves_a_previous_run_aside(tmp_path):
    model, opt = _model_and_opt()
    _save(tmp_path, 1, model, opt)
    _save(tmp_path, 2, model, opt)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / ".cache").mkdir()
    newer = ckpt.archive_newer(tmp_path, 1)
    assert [p.name for p in newer.iterdir()] == ["checkpoint-2"]
    archived = ckpt.archive_previous(tmp_path)
    assert archived.parent == tmp_path and archived.name.startswith("archive-")
    assert sorted(p.name for p in archived.iterdir()) == ["checkpoint-1", "metrics.jsonl"]
    assert ckpt.list_checkpoints(tmp_path) == [] and (tmp_path / ".cache").is_dir()
    assert ckpt.archive_previous(tmp_path) is None


def test_lock_refuses_a_second_run(tmp_path):
    with ckpt.RunLock(tmp_path):
        with pytest.raises(LorafuseError, match=f"pid {os.getpid()}"):
            with ckpt.RunLock(tmp_path):
                pass
    with ckpt.RunLock(tmp_path):  # released
        pass


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LorafuseError, match="not writable") as err:
        ensure_writable_dir(blocker / "run")
    assert "output.dir" in err.value.fix


def test_rng_state_roundtrip():
    rng.seed_everything(5)
    state = rng.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    rng.seed_everything(99)
    rng.set_rng_state(torch.load(_roundtrip(state), weights_only=True))
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf

"""Run status detection and discovery from run folders, the UI's state and log files, and run locks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorafuse.config import demo_config, save_config
from lorafuse.errors import LorafuseError
from lorafuse.training.checkpoint import RunLock
from lorafuse.ui.runs import HEADER, Launcher, discover, last_error, lock_holder, run_status, ui_file


def _checkpoint(folder: Path, step: int) -> None:
    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.pt", "rng.pt"):
        (ck / name).write_bytes(b"x")
    (ck / "trainer_state.json").write_text(json.dumps({"step": step, "total_steps": 50}))


def _summary(folder: Path, reason: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"stop_reason": reason, "total_steps": 50, "adapter_dir": "a"}))


def _log(path: Path, *blocks: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{HEADER} start\n" + "".join(f"{line}\n" for line in b) for b in blocks))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_status_from_the_run_folder(tmp_path):
    finished, early, signal, crashed, fresh = (tmp_path / n for n in ("f", "e", "s", "c", "n"))
    _summary(finished, "finished")
    _summary(early, "early_stopping")
    _summary(signal, "signal")
    _checkpoint(signal, 12)
    _checkpoint(crashed, 20)
    fresh.mkdir()
    assert run_status(finished, None, None)[0] == "finished"
    assert run_status(early, None, None)[0] == "early-stopped"
    assert run_status(signal, None, None) == ("stopped", "checkpoint-12; resume to continue")
    assert run_status(crashed, None, None) == ("stopped", "checkpoint-20; resume to continue")
    assert run_status(fresh, None, None) == ("new", "")


def test_a_failed_process_shows_its_last_error(tmp_path):
    folder = tmp_path / "run"
    _checkpoint(folder, 4)
    log = _log(
        tmp_path / "ui.log",
        ["error: an old problem", "  fix: long fixed"],
        [
            "step 5/9 | loss 2.1",
            "error: the config differs from the one checkpoint-4 was trained with",
            "  fix: use --force",
        ],
    )
    assert run_status(folder, {"pid": 1, "exit": 2}, log) == (
        "failed",
        "error: the config differs from the one checkpoint-4 was trained with\nfix: use --force",
    )
    assert run_status(folder, {"pid": 1, "exit": 1}, tmp_path / "missing.log") == ("failed", "exit status 1")
    # a stop (143 / SIGTERM before the loop ran) is not a failure; the folder tells the rest
    assert run_status(folder, {"pid": 1, "exit": 143}, log)[0] == "stopped"
    assert run_status(folder, {"pid": 1, "exit": -15}, log)[0] == "stopped"
    # the UI restarted and lost the exit status: an error with nothing saved is still a failure
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_status(empty, {"pid": _dead_pid(), "exit": None}, log)[0] == "failed"
    assert last_error(_log(tmp_path / "ok.log", ["error: before"], ["step 1/2 | loss 3.0"])) == ""


def test_running_by_the_ui_process_or_by_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert run_status(folder, {"pid": sleeper.pid, "exit": None}, None)[0] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_status(folder, {"pid": sleeper.pid, "exit": None}, None)[0] == "new"
    with RunLock(folder):  # as `lorafuse train` started in a terminal holds it
        assert lock_holder(folder) is not None
        assert run_status(folder, None, None)[0] == "running"
    assert lock_holder(folder) is None  # the pid in .lock lives on (this process) but holds no lock


def test_discover_lists_run_folders_and_the_ui_runs(tmp_path):
    runs = tmp_path / "runs"
    _summary(runs / "b-done", "finished")
    (runs / "b-done" / "config.yaml").write_text("")
    (runs / "b-done" / "metrics.jsonl").write_text(
        json.dumps({"step": 3, "loss": 2.5}) + "\n" + json.dumps({"step": 3, "eval_loss": 2.4}) + "\n"
    )
    (runs / "not-a-run").mkdir()
    elsewhere = demo_config()
    elsewhere.output.dir = str(tmp_path / "far" / "a-far")
    save_config(elsewhere, ui_file(runs, "a-far", ".yaml"))
    found = discover(runs)
    assert [r.name for r in found] == ["a-far", "b-done"]
    assert found[0].folder == tmp_path / "far" / "a-far" and found[0].status == "new"
    assert (found[1].status, found[1].step, found[1].total, found[1].loss) == ("finished", 3, 50, 2.5)


def test_launcher_keeps_its_files_outside_the_run_and_refuses_a_name_twice(tmp_path):
    runs = tmp_path / "runs"
    launcher = Launcher(runs)
    cfg = demo_config()
    cfg.output.dir = str(tmp_path / "one" / "same")
    save_config(cfg, ui_file(runs, "same", ".yaml"))
    other = demo_config()
    other.output.dir = str(tmp_path / "two" / "same")
    with pytest.raises(LorafuseError, match="already has a run named same"):
        launcher.start(other)
    with pytest.raises(LorafuseError, match="not started from this page"):
        launcher.resume("unknown")
    with pytest.raises(LorafuseError, match="is not running"):
        launcher.stop("same", Path(cfg.output.dir))

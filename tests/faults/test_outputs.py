"""Faults around the files lorafuse writes: output folders it does not own, damaged checkpoints, signals, re-runs,
diverging runs. Each case drives `lorafuse.cli.main` in-process (a subprocess only for a real SIGTERM) and checks
the exit code, the message (the problem and the fix), that no traceback is printed, and that every file that was
there before still has its sha256 (or, where lorafuse moves its own files aside, the same sha256 where it went).

One finished run is built per module (the builtin tiny Llama, 12 rows, 5 steps, a checkpoint every 2 steps) and
copied into each test that needs one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.outputs import MARKER, check_output_file, read_marker, write_marker
from lorafuse.training.loop import TrainingLoop
from lorafuse.training.manifest import MANIFEST, verify

ROOT = Path(__file__).resolve().parents[2]
DEMO_ROWS = ROOT / "lorafuse" / "data" / "samples" / "demo.jsonl"
STEPS = 5


def _argv(out: Path | str, data: Path, *extra: str) -> list[str]:
    """`lorafuse train` on the builtin tiny model: 12 rows of 4 per step (3 steps an epoch), 5 steps."""
    return [
        "train",
        "model.path=builtin:tiny-llama",
        f"data.path={data}",
        "data.num_rows=12",
        "data.max_length=64",
        "data.val_size=0",
        "train.eval_every=null",
        "train.early_stopping_patience=null",
        f"train.max_steps={STEPS}",
        "train.micro_batch_size=4",
        "train.save_every=2",
        "train.save_total_limit=10",
        "train.log_every=1",
        "train.warmup_steps=0",
        "train.device=cpu",
        f"output.dir={out}",
        *extra,
    ]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def _refused(rc: int, err: str, *words: str) -> None:
    """Exit 2, one error line naming the problem, then one fix line, each given word in the message."""
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == len(lines) - 2 and lines[-1].startswith("  fix: "), err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture(autouse=True)
def _wide_console():
    """Rich wraps at 80 columns without a terminal; the assertions read whole lines."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "1000")
        yield


def _tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (`skip`: names left out with what is under them)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not set(p.relative_to(folder).parts) & set(skip)
    }


def _data(folder: Path, n: int = 12) -> Path:
    path = folder / "rows.jsonl"
    path.write_text("".join(DEMO_ROWS.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(a finished run folder, its data file), built once; tests copy the folder."""
    base = tmp_path_factory.mktemp("finished")
    data = _data(base)
    assert main(_argv(base / "run", data)) == 0
    return base / "run", data


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", symlinks=True))


def _strip_markers(run: Path) -> None:
    """What a run folder written before markers and manifests existed looks like."""
    for path in list(run.rglob(MARKER)) + list(run.rglob(MANIFEST)):
        path.unlink()


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))


# --------------------------------------------------------------------------------------------------- run folders


def test_save_every_is_not_also_at_epoch_ends(finished):
    run, _ = finished
    assert _steps(run) == [2, 4, 5]  # epochs end at 3: no checkpoint-3; 5 is the end of training
    assert read_marker(run)["kind"] == "run" and read_marker(run / "adapter")["kind"] == "adapter"
    assert all(verify(run / f"checkpoint-{s}") is None for s in (2, 4, 5))


def test_a_data_preview_before_the_run_leaves_a_folder_the_run_accepts(tmp_path, finished, capsys):
    """`lorafuse data preview CFG` caches the tokenized rows in <output.dir>/.cache; `lorafuse train CFG` then trains
    there (the cache is lorafuse's own)."""
    out = tmp_path / "previewed"
    argv = _argv(out, finished[1])
    rc, _, err = _cli(["data", "preview", *argv[1:], "-n", "1"], capsys)
    assert rc == 0, err
    assert (out / ".cache").is_dir()
    rc, _, err = _cli(argv, capsys)
    assert rc == 0, err
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_run_refuses_a_folder_holding_other_files(tmp_path, finished, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = _tree(mine)
    rc, _, err = _cli(_argv(mine, finished[1]), capsys)
    _refused(rc, err, str(mine), "notes.txt", "did not write", "output.dir")
    assert _tree(mine) == before and sorted(p.name for p in mine.iterdir()) == ["notes.txt", "sub"]


def _hf_trainer_output(folder: Path) -> None:  # what transformers.Trainer leaves: lorafuse's names, not its files
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "trainer_state.json").write_text('{"global_step": 500, "log_history": []}')
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"PK")


def _other_tool_run(folder: Path) -> None:  # a config.yaml and metrics.jsonl another tool wrote
    folder.mkdir()
    (folder / "config.yaml").write_text("model_name: gpt2\nlearning_rate: 0.001\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')


@pytest.mark.parametrize("make", [_hf_trainer_output, _other_tool_run], ids=["hf_trainer", "other_tool"])
def test_run_refuses_another_tools_run_folder(make, tmp_path, finished, capsys):
    theirs = tmp_path / "theirs"
    make(theirs)
    before = _tree(theirs)
    rc, _, err = _cli([*_argv(theirs, finished[1]), "--no-resume"], capsys)
    _refused(rc, err, "files lorafuse did not write", "new or empty folder")
    assert _tree(theirs) == before and not (theirs / MARKER).exists()


@pytest.mark.parametrize("place", ["root", "home", "cwd", "above_cwd", "above_home"])
def test_run_refuses_root_home_and_the_current_folder(place, tmp_path, finished, monkeypatch, capsys):
    import lorafuse.outputs as outputs

    home, work = tmp_path / "home" / "me", tmp_path / "work" / "project"
    home.mkdir(parents=True)
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for name in ("ensure_writable_dir", "write_marker"):  # a tripwire: a refused place is never written to
        monkeypatch.setattr(outputs, name, lambda *a, **k: pytest.fail("wrote into a refused place"))
    path, why = {
        "root": ("/", "root of the filesystem"),
        "home": ("~/", "your home folder"),
        "cwd": (".", "the current folder"),
        "above_cwd": ("..", "above the current folder"),
        "above_home": (str(home.parent), "above your home folder"),
    }[place]
    rc, _, err = _cli(_argv(path, finished[1]), capsys)  # a string: Path("~/") would drop the slash
    _refused(rc, err, why, "output.dir=runs/my-run")
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []


def test_run_refuses_another_commands_output(tmp_path, finished, capsys):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    write_marker(merged, "merge", ["config.json"])
    before = _tree(merged)
    rc, _, err = _cli(_argv(merged, finished[1]), capsys)
    _refused(rc, err, "lorafuse merge output", "new or empty folder")
    assert _tree(merged) == before


def test_legacy_run_folder_is_adopted_and_resumes(tmp_path, finished, capsys):
    run = _copy(finished[0], tmp_path)
    _strip_markers(run)
    (run / "notes.txt").write_text("the user's")
    rc, out, _ = _cli(_argv(run, finished[1], "train.max_steps=6"), capsys)
    assert rc == 0 and f"resuming from {run / 'checkpoint-5'}" in out
    assert read_marker(run)["kind"] == "run" and _steps(run) == [2, 4, 5, 6]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert (run / "notes.txt").read_text() == "the user's"


def test_legacy_run_that_stopped_before_its_first_checkpoint_starts_over(tmp_path, finished, capsys):
    run = _copy(finished[0], tmp_path)
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-5", "adapter", "summary.json", "loss.png"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    _strip_markers(run)  # left: config.yaml + metrics.jsonl (+ .cache, .lock), as a run that died early leaves them
    (run / "notes.txt").write_text("the user's")
    before = _tree(run)
    rc, out, _ = _cli(_argv(run, finished[1]), capsys)
    assert rc == 0
    moved = [line for line in out.splitlines() if line.startswith("starting over:")]
    assert len(moved) == 1 and "config.yaml, metrics.jsonl moved to" in moved[0], out
    archive = next(run.glob("archive-*"))
    assert {f"{archive.name}/{k}": v for k, v in before.items() if k in ("config.yaml", "metrics.jsonl")}.items() <= (
        _tree(run).items()
    )
    assert (run / "notes.txt").read_text() == "the user's" and _steps(run) == [2, 4, 5]


def test_fresh_start_moves_only_lorafuse_files_and_says_so(tmp_path, finished, capsys):
    run = _copy(finished[0], tmp_path)
    (run / "mydata").mkdir()
    (run / "mydata" / "rows.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("the user's")
    before = _tree(run, skip=(".lock",))
    rc, out, _ = _cli([*_argv(run, finished[1]), "--no-resume"], capsys)
    assert rc == 0
    moved = [line for line in out.splitlines() if line.startswith("starting over:")]
    assert len(moved) == 1, out
    archive = next(run.glob("archive-*"))
    names = "adapter, checkpoint-2, checkpoint-4, checkpoint-5, config.yaml, loss.png, metrics.jsonl, summary.json"
    assert sorted(p.name for p in archive.iterdir()) == names.split(", ") and names in moved[0]
    after = _tree(run, skip=(".lock",))
    for rel, digest in before.items():  # every earlier file is where it was, or moved unchanged into the archive
        top = rel.split("/")[0]
        where = rel if top in ("mydata", "notes.txt", ".cache", MARKER) else f"{archive.name}/{rel}"
        assert after[where] == digest, rel


def test_rerun_of_a_finished_run_rewrites_nothing(tmp_path, finished, capsys):
    run = _copy(finished[0], tmp_path)
    before = _tree(run, skip=(".lock",))
    summary = json.loads((run / "summary.json").read_text())
    rc, out, _ = _cli(_argv(run, finished[1]), capsys)
    assert rc == 0
    line = next(line for line in out.splitlines() if line.startswith("already complete: "))
    assert f"finished at step {STEPS} of {STEPS} ({summary['finished_at']})" in line and str(run / "adapter") in line
    assert _tree(run, skip=(".lock",)) == before  # summary.json, adapter, loss.png, checkpoints: all as they were
    assert "demo prompt" not in out


# --------------------------------------------------------------------------------------------------- merge / files


def _merge(out, adapter, model="builtin:tiny-llama") -> list[str]:
    return ["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(out)]


@pytest.mark.parametrize(
    "target, words",
    [
        ("run", ["holds the adapter folder"]),
        ("adapter", ["is the adapter folder"]),
        ("inside_adapter", ["is inside the adapter folder"]),
        ("above_run", ["holds the adapter folder"]),
        ("base_model", ["is the base model folder"]),
        ("other_model", ["holds a model (config.json and weights)"]),
        ("other_run", ["holds a lorafuse run folder"]),
        ("user_folder", ["files lorafuse did not write (keep.txt)"]),
    ],
)
def test_merge_refuses_its_inputs_and_folders_it_did_not_write(
    target, words, tmp_path, finished, tiny_model_dir, capsys
):
    run = _copy(finished[0], tmp_path)
    other_run = Path(shutil.copytree(finished[0], tmp_path / "other-run"))
    other_model = Path(shutil.copytree(tiny_model_dir, tmp_path / "other-model"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("mine")
    out = {
        "run": run,
        "adapter": run / "adapter",
        "inside_adapter": run / "adapter" / "merged",
        "above_run": tmp_path,
        "base_model": tiny_model_dir,
        "other_model": other_model,
        "other_run": other_run,
        "user_folder": tmp_path / "user",
    }[target]
    before, model_before = _tree(tmp_path), _tree(tiny_model_dir)
    rc, _, err = _cli(_merge(out, run / "adapter", model=tiny_model_dir), capsys)
    _refused(rc, err, *words, "folder")
    assert _tree(tmp_path) == before and _tree(tiny_model_dir) == model_before


def test_merge_replaces_only_its_own_earlier_output(tmp_path, finished, capsys):
    out = tmp_path / "merged"
    for _ in range(2):  # the second merge replaces the first one's folder: it is its own earlier output
        rc, printed, _ = _cli([*_merge(out, finished[0] / "adapter"), "--no-check"], capsys)
        assert rc == 0 and f"merged model written to {out}" in printed
    assert read_marker(out)["kind"] == "merge" and (out / "config.json").is_file()
    (out / "notes.txt").write_text("added by hand")
    before = _tree(tmp_path)
    rc, _, err = _cli([*_merge(out, finished[0] / "adapter"), "--no-check"], capsys)
    _refused(rc, err, "notes.txt", "move those files")
    assert _tree(tmp_path) == before


def test_a_single_output_file_replaces_only_a_file_lorafuse_wrote(tmp_path):
    def ours(path: Path) -> bool:  # e.g. an exporter reading its own metadata key back
        return path.read_bytes().startswith(b"LORAFUSE")

    theirs, mine = tmp_path / "model.gguf", tmp_path / "old.gguf"
    theirs.write_bytes(b"GGUF someone else's file")
    mine.write_bytes(b"LORAFUSE export")
    with pytest.raises(LorafuseError, match="not written by lorafuse export") as err:
        check_output_file(theirs, "export", ours)
    assert "new file name" in err.value.fix and theirs.read_bytes() == b"GGUF someone else's file"
    assert check_output_file(mine, "export", ours) == mine
    assert check_output_file(tmp_path / "new.gguf", "export", ours) == tmp_path / "new.gguf"
    with pytest.raises(LorafuseError, match="is a folder"):
        check_output_file(tmp_path, "export", ours)


def test_bench_never_replaces_a_model_folder_it_did_not_build(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the harness lives in benchmarks/
    from bench_child import build_checkpoint

    theirs = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-cpu-float32"))
    before = _tree(theirs)
    probe = build_checkpoint("tiny", str(theirs), "cpu", "float32")
    assert "did not write" in probe["reason"] and "--model-dir" in probe["reason"] and _tree(theirs) == before


# --------------------------------------------------------------------------------------------------- checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # file, how it is spoilt, what the fallback line says with a manifest / for a legacy checkpoint
    "truncated_safetensors": (
        "trainable.safetensors",
        _truncate,
        "trainable.safetensors is",
        "trainable.safetensors is not a complete safetensors file",
    ),
    "bad_checksum": (
        "optimizer.pt",
        _flip_byte,
        "optimizer.pt does not match its sha256",
        "optimizer.pt is not a complete torch.save archive",
    ),
    "missing_optimizer": ("optimizer.pt", Path.unlink, "optimizer.pt is missing", "optimizer.pt is missing"),
    "garbage_trainer_state": (
        "trainer_state.json",
        lambda p: p.write_text("{not json"),
        "trainer_state.json is",
        "trainer_state.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["manifest", "legacy"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(damage, legacy, tmp_path, finished, capsys):
    run = _copy(finished[0], tmp_path)
    if legacy:
        _strip_markers(run)
    name, spoil, with_manifest, without = DAMAGE[damage]
    why = without if legacy else with_manifest
    spoil(run / "checkpoint-5" / name)
    damaged = _tree(run / "checkpoint-5")
    rc, out, _ = _cli(_argv(run, finished[1]), capsys)
    assert rc == 0
    line = next(line for line in out.splitlines() if line.startswith("checkpoint-5: "))
    assert why in line and "resuming from checkpoint-4, the newest intact checkpoint" in line
    archive = next(run.glob("archive-*"))
    assert _tree(archive / "checkpoint-5") == damaged  # set aside as it was, never overwritten
    assert verify(run / "checkpoint-5") is None and json.loads((run / "summary.json").read_text())["steps"] == STEPS


def test_no_intact_checkpoint_is_refused_and_nothing_moves(tmp_path, finished, capsys):
    run = _copy(finished[0], tmp_path)
    for step in (2, 4, 5):
        (run / f"checkpoint-{step}" / "optimizer.pt").unlink()
    before = _tree(run, skip=(".lock",))
    rc, _, err = _cli(_argv(run, finished[1]), capsys)
    _refused(rc, err, "no intact checkpoint", "checkpoint-5: optimizer.pt is missing", "--no-resume")
    assert _tree(run, skip=(".lock",)) == before


def test_resume_from_a_damaged_checkpoint_by_name_is_refused(tmp_path, finished, capsys):
    run = _copy(finished[0], tmp_path)
    _flip_byte(run / "checkpoint-4" / "trainable.safetensors")
    before = _tree(run, skip=(".lock",))
    rc, _, err = _cli([*_argv(run, finished[1]), "--resume", str(run / "checkpoint-4")], capsys)
    _refused(rc, err, "checkpoint-4 is not an intact checkpoint", "does not match its sha256", "--no-resume")
    assert _tree(run, skip=(".lock",)) == before


def test_changed_data_with_the_same_row_count_is_refused_unless_forced(tmp_path, capsys):
    data, run = _data(tmp_path), tmp_path / "run"
    assert _cli(_argv(run, data, "train.max_steps=2"), capsys)[0] == 0
    rows = data.read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(reversed(rows)), encoding="utf-8")  # the same rows, another order: other batches
    before = _tree(run, skip=(".lock", ".cache"))
    rc, _, err = _cli(_argv(run, data, "train.max_steps=3"), capsys)
    _refused(rc, err, "training data changed since checkpoint-2", "--force", "--no-resume")
    assert _tree(run, skip=(".lock", ".cache")) == before
    rc, out, _ = _cli([*_argv(run, data, "train.max_steps=3"), "--force"], capsys)
    assert rc == 0 and "on changed training data (--force)" in out and _steps(run) == [2, 3]


def test_diverging_run_stops_without_an_adapter_and_its_advice_works(tmp_path, capsys):
    data, run = _data(tmp_path), tmp_path / "run"
    assert _cli(_argv(run, data, "train.max_steps=2"), capsys)[0] == 0  # checkpoint-2: good weights
    adapter = _tree(run / "adapter")
    rc, _, err = _cli([*_argv(run, data, "train.max_steps=4", "train.lr=1e30"), "--force"], capsys)
    _refused(rc, err, "NaN/inf", "without saving the weights", "lower train.lr", "resumes from checkpoint-2")
    assert _steps(run) == [2] and _tree(run / "adapter") == adapter  # no checkpoint, no adapter from those weights
    rc, out, _ = _cli([*_argv(run, data, "train.max_steps=4", "train.lr=1e-3"), "--force"], capsys)
    assert rc == 0 and f"resuming from {run / 'checkpoint-2'}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "finished" and summary["steps"] == 4 and summary["last_loss"] < 100
    assert verify(run / "checkpoint-4") is None


# --------------------------------------------------------------------------------------------------- signals


def _signal_at(monkeypatch, step: int, *signums: int) -> None:
    """Send `signums` to this process right after optimizer step `step` (as a terminal or a scheduler would)."""
    real = TrainingLoop.step

    def step_then_signal(self, batches):
        row = real(self, batches)
        if self.state.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return row

    monkeypatch.setattr(TrainingLoop, "step", step_then_signal)


def test_ctrl_c_exits_130_after_saving_a_resumable_checkpoint(tmp_path, finished, monkeypatch, capsys):
    run = tmp_path / "run"
    _signal_at(monkeypatch, 3, signal.SIGINT)
    rc, out, _ = _cli(_argv(run, finished[1]), capsys)
    assert rc == 130 and "stopped at step 3; checkpoint-3 saved; run the same command to resume" in out
    assert verify(run / "checkpoint-3") is None and not (run / "adapter").exists()
    monkeypatch.undo()
    rc, out, _ = _cli(_argv(run, finished[1]), capsys)
    assert rc == 0 and f"resuming from {run / 'checkpoint-3'}" in out and (run / "adapter").is_dir()


def test_a_second_ctrl_c_interrupts_at_once(tmp_path, finished, monkeypatch, capsys):
    run = tmp_path / "run"
    _signal_at(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    rc, out, err = _cli(_argv(run, finished[1]), capsys)
    assert rc == 130 and "interrupted" in err and "stopped at step" not in out
    assert _steps(run) == [2]  # step 3 was not saved: the second Ctrl-C does not wait


def test_python_api_returns_a_signal_stop_without_exiting(tmp_path, finished, monkeypatch):
    from lorafuse.config import load_config
    from lorafuse.job import run as run_job

    _signal_at(monkeypatch, 1, signal.SIGTERM)
    cfg = load_config(None, _argv(tmp_path / "run", finished[1])[1:])
    result = run_job(cfg)  # no SystemExit: only the CLI turns the signal into an exit status
    assert result.stop_reason == "signal" and result.stop_signal == "SIGTERM" and result.exit_code == 143
    assert result.steps == 1 and result.adapter_dir is None and verify(tmp_path / "run" / "checkpoint-1") is None


_SLOW_STEPS = """
import sys, time
from lorafuse.training.loop import TrainingLoop
real = TrainingLoop.step
def slow_step(self, batches):  # a step slow enough for the test to signal mid-run
    row = real(self, batches)
    print(f"STEP {self.state.step}", flush=True)
    time.sleep(0.2)
    return row
TrainingLoop.step = slow_step
from lorafuse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_exits_143_after_saving_and_the_same_command_resumes(tmp_path, finished, capsys):
    run, argv = tmp_path / "run", _argv(tmp_path / "run", finished[1], "train.max_steps=12")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "1000"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_STEPS, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    for line in proc.stdout:
        if line.startswith("STEP 3"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step ")]
    step = int(stopped[0].split()[3].rstrip(";"))
    assert stopped == [f"stopped at step {step}; checkpoint-{step} saved; run the same command to resume"]
    assert 3 <= step < 12 and verify(run / f"checkpoint-{step}") is None and "Traceback" not in err
    rc, out, _ = _cli(argv, capsys)
    assert rc == 0 and f"resuming from {run / f'checkpoint-{step}'}" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 12

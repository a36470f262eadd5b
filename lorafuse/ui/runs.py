"""The runs the UI lists, their status, and the `lorafuse train` processes it starts and stops.

A run is an output folder: a folder under the runs folder holding config.yaml, metrics.jsonl or a checkpoint,
or the output.dir of a config the UI started. The UI's own files stay outside run folders (a run refuses an
output folder holding files it did not write):

    <runs>/.lorafuse-ui/<name>.yaml   the form's config, as `lorafuse train` reads it (<name>: output.dir's name)
    <runs>/.lorafuse-ui/<name>.log    the process's output, appended at each start under a "[lorafuse ui]" line
    <runs>/.lorafuse-ui/<name>.json   {"pid", "command", "started", "exit"}: the last process and how it ended

Start and resume run `python -m lorafuse train <name>.yaml`, the command a user runs (the CLI resumes from the
latest checkpoint); stop sends SIGTERM, on which the job saves a checkpoint and exits.

Status, first match wins:
    running        the process the UI started is alive, or the run folder's .lock is held by a live process
    failed         the last process exited with a status other than 0, 130 or 143 (or died of another signal);
                   the detail is the last "error:" line (and its "fix:") that process printed
    finished       summary.json says stop_reason finished / already_complete; early-stopped for early_stopping
    stopped        summary.json says signal, or there is a checkpoint and no summary (a stop or a crash)
    failed         no summary and no checkpoint, and the process printed an "error:" line
    new            nothing of the above (a folder with no checkpoint yet)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lorafuse.atomic import process_running, write_atomic
from lorafuse.errors import LorafuseError

UI_DIR = ".lorafuse-ui"
HEADER = "[lorafuse ui]"
STOPPED_EXITS = {0, 130, 143, -signal.SIGTERM, -signal.SIGINT}


@dataclass
class Run:
    name: str
    folder: Path
    status: str
    detail: str = ""
    step: int | None = None
    total: int | None = None
    loss: float | None = None


def ui_file(runs_dir: Path, name: str, suffix: str) -> Path:
    return Path(runs_dir) / UI_DIR / f"{name}{suffix}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def lock_holder(folder: Path) -> int | None:
    """The pid holding the run folder's lock (lorafuse.training.checkpoint.RunLock), or None."""
    path = Path(folder) / ".lock"
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if not process_running(pid):
        return None
    try:
        import fcntl
    except ImportError:  # no flock: a live pid is all there is to go on
        return pid
    fd = os.open(path, os.O_RDONLY)
    try:  # a shared lock is refused only while the run holds its exclusive one
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return pid
    finally:
        os.close(fd)  # also releases a shared lock we got
    return None


def last_error(log: Path) -> str:
    """The last "error:" line (with its "fix:" line) printed since the log's last start header."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    lines = lines[starts[-1] + 1 :] if starts else lines
    found = ""
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            fix = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].strip().startswith("fix:") else ""
            found = line + (f"\n{fix}" if fix else "")
    return found


def _progress(folder: Path) -> tuple[int | None, float | None]:
    """(step, loss) of the last training row of metrics.jsonl."""
    try:
        lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None, None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            return row.get("step"), row.get("loss")
    return None, None


def _checkpoints(folder: Path) -> list[int]:
    from lorafuse.training.checkpoint import list_checkpoints

    return [step for step, _ in list_checkpoints(folder)]


def run_status(folder: Path, state: dict | None, log: Path | None) -> tuple[str, str]:
    """(status, detail) of a run folder (module docstring); `state` is the UI's <name>.json, if any."""
    state = state or {}
    if (state.get("exit") is None and process_running(state.get("pid"))) or lock_holder(folder) is not None:
        return "running", ""
    code = state.get("exit")
    error = last_error(log) if log is not None else ""
    if code is not None and code not in STOPPED_EXITS:
        return "failed", error or f"exit status {code}"
    summary = _read_json(Path(folder) / "summary.json") or {}
    reason = summary.get("stop_reason")
    if reason in ("finished", "already_complete"):
        return "finished", f"adapter: {summary.get('adapter_dir')}"
    if reason == "early_stopping":
        return "early-stopped", f"best eval loss {summary.get('best_eval_loss')} at step {summary.get('best_step')}"
    steps = _checkpoints(Path(folder))
    if reason == "signal" or steps:
        where = f"checkpoint-{steps[-1]}" if steps else "no checkpoint"
        return "stopped", f"{where}; resume to continue"
    if error:
        return "failed", error
    return "new", ""


def _total(folder: Path) -> int | None:
    summary = _read_json(folder / "summary.json")
    if summary and summary.get("total_steps"):
        return summary["total_steps"]
    steps = _checkpoints(folder)
    state = _read_json(folder / f"checkpoint-{steps[-1]}" / "trainer_state.json") if steps else None
    return (state or {}).get("total_steps")


def _is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and (
        (folder / "config.yaml").is_file() or (folder / "metrics.jsonl").is_file() or bool(_checkpoints(folder))
    )


def discover(runs_dir: Path) -> list[Run]:
    """Every run under `runs_dir` and every run the UI started (its config's output.dir), sorted by name."""
    runs_dir = Path(runs_dir)
    folders: dict[str, Path] = {}
    if runs_dir.is_dir():
        folders.update({p.name: p for p in runs_dir.iterdir() if not p.name.startswith(".") and _is_run_folder(p)})
    for yaml_path in sorted((runs_dir / UI_DIR).glob("*.yaml")):
        try:
            from lorafuse.config import load_config

            folders[yaml_path.stem] = Path(load_config(yaml_path).output.dir)
        except LorafuseError:
            continue
    found = []
    for name, folder in sorted(folders.items()):
        state = _read_json(ui_file(runs_dir, name, ".json"))
        status, detail = run_status(folder, state, ui_file(runs_dir, name, ".log"))
        step, loss = _progress(folder)
        found.append(Run(name, folder, status, detail, step, _total(folder), loss))
    return found


class Launcher:
    """Starts and stops `python -m lorafuse train` for the UI; one process per run name at a time."""

    def __init__(self, runs_dir: Path, env: dict | None = None):
        self.runs_dir = Path(runs_dir)
        # The log is read as a wide terminal would show it: rich wraps a non-terminal's output at 80 columns.
        self.env = {"COLUMNS": "200", **(os.environ if env is None else env)}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, cfg) -> tuple[str, str]:
        """Write `cfg` to <name>.yaml and run it; returns (name, the command line)."""
        from lorafuse.config import load_config, save_config

        name = Path(cfg.output.dir).name
        yaml_path = ui_file(self.runs_dir, name, ".yaml")
        if yaml_path.is_file():
            other = Path(load_config(yaml_path).output.dir).resolve()
            if other != Path(cfg.output.dir).resolve():
                raise LorafuseError(
                    f"the UI already has a run named {name} (output.dir {other})",
                    "give output.dir a folder with another name",
                )
        self._refuse_running(name, Path(cfg.output.dir))
        yaml_path.parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, yaml_path)
        return name, self._launch(name, yaml_path)

    def resume(self, name: str) -> str:
        """Run the same command again (the CLI resumes from the latest checkpoint)."""
        yaml_path = ui_file(self.runs_dir, name, ".yaml")
        if not yaml_path.is_file():
            raise LorafuseError(
                f"{name} was not started from this page, so there is no command to run again",
                f"run `lorafuse train <its config>` in a terminal, or load {name}'s config.yaml in the form and "
                "start it",
            )
        from lorafuse.config import load_config

        self._refuse_running(name, Path(load_config(yaml_path).output.dir))
        return self._launch(name, yaml_path)

    def stop(self, name: str, folder: Path) -> int:
        """SIGTERM to the run's process (the one the UI started, else the holder of the folder's lock)."""
        proc = self.procs.get(name)
        pid = proc.pid if proc is not None and proc.poll() is None else lock_holder(folder)
        if pid is None:
            raise LorafuseError(f"{name} is not running", "start or resume it first")
        os.kill(pid, signal.SIGTERM)
        return pid

    def _refuse_running(self, name: str, folder: Path) -> None:
        proc = self.procs.get(name)
        if (proc is not None and proc.poll() is None) or lock_holder(folder) is not None:
            raise LorafuseError(f"{name} is already running", "stop it first, or wait for it to finish")

    def _launch(self, name: str, yaml_path: Path) -> str:
        command = [sys.executable, "-m", "lorafuse", "train", str(yaml_path)]
        line = " ".join(command)
        log_path = ui_file(self.runs_dir, name, ".log")
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            log.flush()
            # A session of its own: Ctrl-C on the UI does not stop the run; the Stop button does.
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs[name] = proc
        state_path = ui_file(self.runs_dir, name, ".json")
        state = {"pid": proc.pid, "command": command, "started": time.time(), "exit": None}
        write_atomic(state_path, json.dumps(state))
        threading.Thread(target=self._wait, args=(proc, state, state_path), daemon=True).start()
        return line

    @staticmethod
    def _wait(proc: subprocess.Popen, state: dict, state_path: Path) -> None:
        state["exit"] = proc.wait()
        write_atomic(state_path, json.dumps(state))

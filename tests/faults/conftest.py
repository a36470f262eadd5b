"""The fault suite's harness: bad inputs and faults driven through the real CLI, in process.

Each case runs `lorafuse.cli.main(argv)` (the entry point the `lorafuse` command calls) and checks what a user sees:
the exit status, exactly one "error: ..." line followed by a "  fix: ..." line (`extra_lines` allows a quoted source
line or a list), the words that name the problem, no "Traceback" anywhere, and that an earlier finished run's files
are byte for byte what they were (sha256 of every file). That earlier run is trained once per session on the builtin
tiny model (2 steps, a checkpoint per step) and copied into each test's folder, so a case may point a command at it.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lorafuse.cli import main

# A run of the builtin demo config cut down to seconds: 2 steps, a checkpoint each, no validation, no trained head.
TINY_RUN = (
    "train.max_steps=2",
    "train.save_every=1",
    "train.eval_every=null",
    "train.early_stopping_patience=null",
    "data.val_size=0",
    "lora.modules_to_save=null",
)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def fault_cache(tmp_path_factory) -> Path:
    """LORAFUSE_CACHE for the whole suite: the builtin tiny model is built once."""
    return tmp_path_factory.mktemp("lorafuse-cache")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, fault_cache) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFUSE_CACHE", str(fault_cache))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(["train", f"output.dir={folder}", *TINY_RUN]) == 0
        finally:
            torch.set_num_threads(threads)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (folder / "checkpoint-2").is_dir()
    return folder, tree_hashes(folder)


@dataclass
class Outcome:
    code: int
    out: str
    err: str


class FaultCLI:
    """Runs the CLI for one test; `earlier` is this test's copy of the finished run, `out` a fresh output.dir."""

    def __init__(self, capsys, tmp_path: Path, finished: tuple[Path, dict[str, str]]):
        self.capsys, self.tmp = capsys, tmp_path
        self.earlier = tmp_path / "earlier-run"
        shutil.copytree(finished[0], self.earlier)
        self.hashes = finished[1]
        self.out = tmp_path / "run"

    def run(self, *argv: str) -> Outcome:
        self.capsys.readouterr()  # drop what the fixtures printed
        code = main([str(a) for a in argv])
        captured = self.capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    def train(self, *overrides: str) -> list[str]:
        """argv of a tiny `lorafuse train` into this test's fresh output.dir, with `overrides` last."""
        return ["train", f"output.dir={self.out}", *TINY_RUN, *overrides]

    def fails(self, *argv: str, says=(), extra_lines: int = 0) -> str:
        """Run, assert a user error (module docstring) that contains every word in `says`; return its text."""
        result = self.run(*argv)
        message = user_error(result, extra_lines)
        for word in says:
            assert word in message, f"{word!r} not in the error:\n{message}"
        self.assert_earlier_untouched()
        return message

    def assert_earlier_untouched(self) -> None:
        assert tree_hashes(self.earlier) == self.hashes, "the earlier run's files changed"

    def model_copy(self) -> Path:
        """A copy of the builtin tiny model's folder, for a case to damage."""
        from lorafuse.model.load import resolve_model_path

        folder = self.tmp / "model"
        shutil.copytree(resolve_model_path("builtin:tiny-llama"), folder)
        return folder

    def adapter_copy(self) -> Path:
        """A copy of the earlier run's adapter, for a case to damage."""
        folder = self.tmp / "adapter"
        shutil.copytree(self.earlier / "adapter", folder)
        return folder


def user_error(result: Outcome, extra_lines: int = 0) -> str:
    """Exit 2, no traceback, one "error:" line (+ extra_lines) then a non-empty "  fix:" line; returns them."""
    assert result.code == 2, f"exit status {result.code}; stderr:\n{result.err}"
    assert "Traceback" not in result.err and "Traceback" not in result.out, result.err
    lines = result.err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, f"expected one error line:\n{result.err}"
    fix = starts[0] + 1 + extra_lines
    assert fix < len(lines) and lines[fix].startswith("  fix: ") and len(lines[fix].strip()) > 12, result.err
    assert not any(line.startswith("  fix: ") for line in lines[starts[0] + 1 : fix]), result.err
    return "\n".join(lines[starts[0] : fix + 1])


@pytest.fixture
def cli(capsys, tmp_path, monkeypatch, fault_cache, finished_run) -> FaultCLI:
    monkeypatch.setenv("LORAFUSE_CACHE", str(fault_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a relative path or a stray folder lands here, never in the repository
    return FaultCLI(capsys, tmp_path, finished_run)

"""The README's two set-up commands pass exactly as written on a fresh machine: each runs, word for word, in a new
virtual environment inside a fresh copy of the checkout (what a user has after `git clone`), with nothing installed
beforehand but what pip itself finds (its wheel cache and the machine's local torch file, see the README). The clone
is of the committed checkout, as CI's is.

Slow: it installs lorafuse twice (once with the test extras) and runs the demo and the whole default suite again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    """The two commands under "## Set-up: two commands", as written."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Set-up: two commands")[1].split("\n## ")[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def _fresh_checkout(dest: Path) -> Path:
    """A clone of this checkout's commit: what a user has after `git clone`."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True, capture_output=True)
    return dest


def _run_in_venv(command: str, cwd: Path, env_dir: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV", "PYTHON"))}
    env.update(
        PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}",
        VIRTUAL_ENV=str(env_dir),
        LORAFUSE_CACHE=str(home / "lorafuse-cache"),
        HF_HOME=str(home / "hf"),
    )
    for switch in ("TRITON_INTERPRET", "HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY"):  # the suite's own settings
        env.pop(switch, None)
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )


def test_the_readme_lists_two_set_up_commands():
    commands = readme_setup_commands()
    assert len(commands) == 2 and all("pip install torch==2.13.0" in c for c in commands)
    assert commands[0].endswith("lorafuse train") and commands[1].endswith("python -m pytest -q")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the README's commands are for Linux (torch's CPU build)")
def test_the_readme_set_up_commands_pass_as_written_in_a_fresh_venv(tmp_path):
    demo, tests = readme_setup_commands()
    for name, command in (("demo", demo), ("tests", tests)):
        checkout = _fresh_checkout(tmp_path / name / "lorafuse")
        env_dir = tmp_path / name / "venv"
        venv.create(env_dir, with_pip=True)
        done = _run_in_venv(command, checkout, env_dir, tmp_path / name)
        tail = f"{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-1500:]}"
        assert done.returncode == 0, f"`{command}` failed:\n{tail}"
        if name == "demo":
            assert "held-out exact answers:" in done.stdout and "lorafuse run summary" in done.stdout, tail
        else:
            summary = done.stdout.strip().splitlines()[-1]
            assert " passed" in summary and "failed" not in summary and "error" not in summary, tail

"""`lorafuse ui`: the command line, a missing Gradio, and the warning for a non-local address."""

from __future__ import annotations

import importlib.util

import pytest

from lorafuse.cli import main
from lorafuse.ui import app


def test_without_gradio_the_command_says_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["ui", "--runs", "r"]) == 2
    assert "pip install 'lorafuse[ui]'" in capsys.readouterr().err


class _Page:
    def __init__(self):
        self.launched = None

    def queue(self, **kwargs):
        return self

    def launch(self, **kwargs):
        self.launched = kwargs


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_binds_to_localhost_unless_told_and_warns_otherwise(tmp_path, monkeypatch, capsys, host, warned):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gradio" else real(name, *a))
    page = _Page()
    monkeypatch.setattr(app, "build_app", lambda runs: page)
    monkeypatch.setattr(app, "theme", lambda: None)  # no Gradio import: this test is about the address
    args = ["ui", "--runs", str(tmp_path / "runs"), "--port", "7999"] + (
        ["--host", host] if host != "127.0.0.1" else []
    )
    assert main(args) == 0
    assert page.launched["server_name"] == host and page.launched["server_port"] == 7999
    assert ("warning: serving on 0.0.0.0" in capsys.readouterr().err) is warned

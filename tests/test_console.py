"""Output that is not a terminal is never wrapped: a long line stays one line, the run summary keeps whole paths."""

from __future__ import annotations

import io

from lorafuse.console import make_console
from lorafuse.training.metrics import print_summary


def test_a_console_that_is_not_a_terminal_never_wraps():
    buf = io.StringIO()
    console = make_console(file=buf, width=80)
    line = "tokens: 5,456 total, 1,736 trained (68.2% masked), longest row 22, longest prompt 15 " * 3
    console.print(line.strip())
    assert buf.getvalue() == line.strip() + "\n"


def test_the_run_summary_keeps_a_long_path_whole():
    buf = io.StringIO()
    adapter = "/a/long/path/" + "x" * 120 + "/adapter"
    print_summary(make_console(file=buf, width=80), {"stop_reason": "finished", "steps": 3, "adapter_dir": adapter})
    assert any(line.split() == ["adapter", adapter] for line in buf.getvalue().splitlines())

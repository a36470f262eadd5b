"""Metrics log, plot, progress display and summary."""

from __future__ import annotations

import io
import json
import math

from rich.console import Console

from lorafuse.training.metrics import MetricsLog, Progress, memory_bytes, print_summary


def test_jsonl_nan_restore_and_plot(tmp_path):
    log = MetricsLog(tmp_path)
    log.append({"step": 1, "loss": 2.5, "lr": 1e-3})
    log.append({"step": 2, "loss": math.nan, "lr": 1e-3, "skipped": True})
    log.append({"step": 2, "eval_loss": 2.4, "eval_ppl": math.exp(2.4)})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] is None and rows[0]["loss"] == 2.5
    png = log.plot(tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.restore(json.dumps(rows[0]) + "\n")  # a resume drops the rows written after its checkpoint
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(rows[0]) + "\n"
    log.append({"step": 2, "loss": 2.0, "lr": 1e-3})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_plain_progress_when_not_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    p = Progress(console, total=10)
    p.update(3, {"loss": 1.2345, "lr": 2e-4, "tokens_per_s": 1500.0, "memory_mb": 512.0}, eta_s=65)
    p.close()
    assert buf.getvalue().strip() == "step 3/10 | loss 1.2345 | lr 2.00e-04 | 1500 tok/s | mem 512 MB | eta 0:01:05"


def test_rich_bar_on_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=150)
    p = Progress(console, total=10)
    assert not p.plain
    p.update(5, {"loss": 0.5, "lr": 1e-4, "tokens_per_s": 10.0, "memory_mb": 2048.0})
    p.close()
    out = buf.getvalue()
    assert "step 5/10" in out and "loss 0.5000" in out and "mem 2.00 GB" in out


def test_memory_reading_is_the_process_size():
    assert memory_bytes("cpu") > 10 * 2**20


def test_summary_table():
    buf = io.StringIO()
    print_summary(
        Console(file=buf, width=120),
        {
            "stop_reason": "finished",
            "steps": 80,
            "wall_s": 125.0,
            "tokens": 40000,
            "tokens_per_s": 320.0,
            "peak_memory_bytes": 600 * 2**20,
            "first_loss": 6.1,
            "last_loss": 2.3,
            "best_eval_loss": 3.2,
            "best_step": 80,
            "best_checkpoint": "runs/demo/checkpoint-80",
            "adapter_dir": "runs/demo/adapter",
        },
    )
    out = buf.getvalue()
    for text in (
        "finished",
        "0:02:05",
        "40,000",
        "600 MB",
        "6.1000 / 2.3000",
        "3.2000 at step 80",
        "runs/demo/adapter",
    ):
        assert text in out

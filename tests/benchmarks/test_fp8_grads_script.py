"""benchmarks/fp8_grads.py on a CPU (its bf16 mode only: FP8 needs an FP8 GPU): the comparison it reports is real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark script's test: run with `-m slow`

ROOT = Path(__file__).resolve().parents[2]


def test_fp8_grads_reports_bf16_rounding_of_the_lora_gradients(tmp_path):
    """The tiny model's bf16 LoRA gradients against its fp32 reference: not equal (the two paths really differ in
    precision) and within a few bf16 roundings (8 mantissa bits, ~0.4% a step, through 2 layers and a loss): a
    comparison of mismatched models or adapters would land near 1."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "fp8_grads.py"),
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "32",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "fp8_grads.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["bf16"]
    errors = rows[0]["rel_err"]
    assert set(errors) == {"0", "1"}
    assert all(0 < e < 0.05 for e in errors.values()), errors
    assert "bf16 |" in done.stdout

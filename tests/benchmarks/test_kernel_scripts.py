"""benchmarks/bench_kernels.py and benchmarks/bench_dequant.py in their --smoke runs on a CPU: every row they time
on a GPU runs here too, and the JSON lines say what was timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark script's test: run with `-m slow`

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_bench_kernels_smoke_times_every_op_and_its_reference(tmp_path):
    rows = _run("bench_kernels.py", tmp_path / "kernels.jsonl")
    ours = [r for r in rows if r["variant"] not in ("bitsandbytes", "liger", "liger-flce")]  # peers: optional
    assert not [r for r in ours if "error" in r]
    ops = {r["op"] for r in rows}
    assert ops == {"nf4_dequant", "lora_linear", "rmsnorm", "rope", "swiglu_mlp", "ce"}
    for op in ops:
        variants = {r["variant"] for r in ours if r["op"] == op}
        assert any("reference" in v for v in variants) and len(variants) >= 2, (op, variants)
    lora = {(r["shape"], r["variant"]) for r in ours if r["op"] == "lora_linear"}
    for base in ("dense", "nf4"):
        for variant in ("fused", "fused+dsdb", "reference"):
            assert ("q_proj M32 K64 N64", f"{base}-{variant}") in lora
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["card"] == "cpu" for r in ours)


def test_bench_dequant_smoke_checks_every_configuration_bit_for_bit(tmp_path):
    from lorafuse.kernels.nf4_dequant import SWEEP

    rows = [r for r in _run("bench_dequant.py", tmp_path / "dequant.jsonl") if "shape" in r]
    assert {(r["config"], r["shape"]) for r in rows} == {(str(c), s) for c in SWEEP for s in ("64x128", "37x53")}
    assert all(r["exact"] and r["us"] > 0 for r in rows)

"""benchmarks/memory_peak.py: its layer-boundary readings come in the order the step runs, and the script runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafuse

pytestmark = pytest.mark.slow  # a benchmark script's test: run with `-m slow`

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("memory_peak", ROOT / "benchmarks" / "memory_peak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_marks_follow_forward_then_backward(tiny_model_dir):
    model, _ = lorafuse.load_model(str(tiny_model_dir), quant="none", compute_dtype="float32", device="cpu")
    lorafuse.apply_lora(model, r=4, alpha=8, targets="all-linear")
    marks = _module().PhaseMarks(model)
    ids = torch.randint(4, 100, (2, 16))
    marks.mark("step start")
    model(input_ids=ids, labels=ids).loss.backward()
    marks.step_done()
    tags = [t for t, _, _ in marks.marks]
    n = len(model.model.layers)
    forward = [tag for i in range(n) for tag in (f"fwd{i}<", f"fwd{i}>")] + ["fwdnorm>"]
    backward = ["bwdnorm<"] + [f"bwd{i}<" for i in reversed(range(n))]
    assert tags == ["step start"] + forward + backward + ["step end (optimizer done)"]
    assert all(alloc == 0.0 and peak == 0.0 for _, alloc, peak in marks.marks)  # no CUDA here: readings are 0


def test_the_script_runs_a_tiny_qlora_step_beside_the_planner(tmp_path):
    """The whole script as `lorafuse bench --random-init` builds the step, on a CPU: two marked steps in the order
    they run (every reading 0 without CUDA), the planner's phase and parts for the same workload, the report file."""
    from lorafuse.plan.shapes import builtin_shape

    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_peak.py"), "--shape", "tiny", "--method", "qlora"]
    done = subprocess.run(
        cmd + ["--batch", "2", "--seq", "32", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "memory-peak-tiny-qlora-2x32.json").read_text())
    n = builtin_shape("tiny").num_layers
    step = ["step start"] + [tag for i in range(n) for tag in (f"fwd{i}<", f"fwd{i}>")] + ["fwdnorm>", "bwdnorm<"]
    step += [f"bwd{i}<" for i in reversed(range(n))] + ["step end (optimizer done)"]
    assert [tag for tag, _, _ in report["timeline"]] == step + step
    assert report["max_allocated_gib"] == 0.0 and report["live_at_step_end"] == []
    assert report["predicted_phase"] in ("loss", "forward", "backward", "optimizer step")
    parts = report["predicted_components_gib"]
    assert report["predicted_peak_alloc_gib"] > 0 and parts["weights_nf4"] > 0 and parts["lora_params"] > 0
    assert {w["until"] for w in report["highest_windows"]} <= set(step)
    assert json.loads(done.stdout)["shape"] == "tiny"  # the printed summary is the report less its timeline

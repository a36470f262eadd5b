"""benchmarks/memory_peak.py's layer-boundary readings: the tags come in the order the step runs."""

from __future__ import annotations

import importlib.util
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

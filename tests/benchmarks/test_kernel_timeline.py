"""benchmarks/peers/bench_common.kernel_timeline: the GPU's idle gaps between kernels, from profiler events."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

pytestmark = pytest.mark.slow  # a benchmark script's test: run with `-m slow`

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "peers" / "bench_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _event(name, start, end, device=DeviceType.CUDA):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device)


def test_gaps_busy_time_and_overlap():
    # (us) a 0-10k, b 15k-20k and c 18k-30k overlapping it (a side stream), d 100k-110k, e 5 us after d; a CPU
    # event in the idle stretch that must not count
    events = [
        _event("d", 100e3, 110e3),
        _event("a", 0, 10e3),
        _event("c", 18e3, 30e3),
        _event("b", 15e3, 20e3),
        _event("e", 110005, 110010),
        _event("host", 30e3, 100e3, DeviceType.CPU),
    ]
    text = _module().kernel_timeline(SimpleNamespace(events=lambda: events), steps=1)
    head, _, *gaps = text.splitlines()
    assert head == (
        "kernel timeline over 1 steps: 5 kernels, span 110.0 ms, busy 35.0 ms, idle 75.0 ms in 3 gaps "
        "(0.0 ms in gaps under 10 us)"
    )
    assert [g.split() for g in gaps] == [
        ["70000.0", "c", "->", "d"],
        ["5000.0", "a", "->", "b"],
        ["5.0", "d", "->", "e"],
    ]  # after the overlapped pair: from c's end

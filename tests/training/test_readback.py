"""Device values read late, updates a device flag cancels, and step counters taken back (lorafuse.training.readback)."""

from __future__ import annotations

import time

import torch

from lorafuse.training.readback import CancelledSteps, Readback, StepClock, kept_unless


def test_readback_is_a_snapshot_of_the_values_when_it_was_made():
    values = torch.tensor([1.5, float("nan"), 3.0])
    back = Readback(values)
    values.fill_(7.0)  # the step's buffers are reused after the readback was queued
    got = back.get()
    assert got[0] == 1.5 and got[1] != got[1] and got[2] == 3.0


def test_kept_unless_false_restores_every_bit_and_true_keeps_the_update():
    base = [torch.randn(50), torch.randint(0, 255, (50,), dtype=torch.uint8)]
    for apply in (torch.tensor(False), torch.tensor(True), None):
        tensors = [t.clone() for t in base]
        with kept_unless(apply, tensors):
            tensors[0].mul_(float("nan"))  # what a NaN gradient does to an update
            tensors[1].add_(3)
        if apply is not None and not apply:
            assert all(torch.equal(t, b) for t, b in zip(tensors, base))
        else:
            assert tensors[0].isnan().all() and torch.equal(tensors[1], base[1] + 3)


def test_cancelled_steps_take_the_counters_back_only_for_a_false_flag():
    states = [{"step": 3}, {"step": torch.tensor(3.0)}]  # 8-bit AdamW's int, torch AdamW's CPU tensor
    pending = CancelledSteps()
    for s in states:
        s["step"] += 1
    pending.record(torch.tensor(True), states)
    pending.settle()
    assert [int(s["step"]) for s in states] == [4, 4]
    for s in states:
        s["step"] += 1
    pending.record(torch.tensor(False), states)
    assert [int(s["step"]) for s in states] == [5, 5]  # not read until needed
    pending.settle()
    pending.settle()  # once only
    assert [int(s["step"]) for s in states] == [4, 4]


def test_step_clock_on_the_cpu_is_the_hosts_clock_at_the_mark():
    clock = StepClock(torch.device("cpu"))
    before = time.perf_counter()
    mark = clock.mark()
    time.sleep(0.01)
    assert before <= clock.seconds(mark) < time.perf_counter() - 0.005  # when marked, not when read

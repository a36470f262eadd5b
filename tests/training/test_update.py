"""A step's row from the values read back late (lorafuse.training.update.StepRecord.row): the fields and values the
loop logged when it read them at once (the update itself: tests/training/test_optim_skip.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lorafuse.training.readback import Readback
from lorafuse.training.update import StepRecord, clip_and_step


def _record(values, units=8, reason=None) -> StepRecord:
    return StepRecord(
        step=3,
        epoch=0.5,
        lr=1e-3,
        units=units,
        n_input=40,
        n_target=8,
        tokens=120,
        memory_mb=1.0,
        last=False,
        values=Readback(torch.tensor(values, dtype=torch.float32)),
        done=0.0,
        reason=reason,
    )


@pytest.mark.parametrize(
    "values,units,reason,want",
    [
        ([20.0, 4.0, 0.5, 1.0], 8, None, (2.5, 0.5, 0.5, None)),  # loss and the metric per unit, the norm as read
        ([math.nan, math.nan, math.nan, 0.0], 8, None, (math.nan, math.nan, None, "nan")),  # NaN loss: no norm
        ([20.0, 4.0, math.inf, 0.0], 8, None, (2.5, 0.5, math.inf, "nan")),  # finite loss, non-finite norm
        ([0.0, 0.0, math.nan, 0.0], 0, "nan", (math.nan, math.nan, None, "nan")),  # no units in the window
        ([20.0, 4.0, 3.0, 0.0], 8, "fp16_overflow", (2.5, 0.5, 3.0, "fp16_overflow")),  # decided on the host
    ],
)
def test_a_steps_row_has_the_values_the_host_read_at_once(values, units, reason, want):
    row = _record(values, units, reason).row(("rewards/margin",))
    got = (row["loss"], row["rewards/margin"], row["grad_norm"], row["skipped"])
    assert all(g == w or (g != g and w != w) for g, w in zip(got, want)), got  # NaN matches NaN
    assert (row["lr"], row["units"], row["n_input"], row["n_target"]) == (1e-3, units, 40, 8)


def test_a_window_without_units_is_skipped_without_touching_the_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=1.0)
    values, reason = clip_and_step(opt, [p], 1.0, torch.zeros(1), units=0)
    assert reason == "nan" and torch.equal(p.detach(), torch.ones(3)) and torch.equal(p.grad, torch.ones(3))
    assert values.get()[-1] == 0.0

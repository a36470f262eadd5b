"""The end of a training step: clipping and the optimizer update, decided on the device, and the step's numbers as a
`StepRecord` the loop reads back later.

A step is skipped (no update, its row marked "skipped") when its loss is NaN/inf or its gradient norm before clipping
is. The decision stays on the device:

    g <- g * min(1, max_norm / (||g|| + 1e-6))               (torch.nn.utils.clip_grad_norm_)
    applied = isfinite(loss_sum) & isfinite(||g||)           (0-dim bool)
    optimizer.step(apply=applied)                            (False: parameters, states and step counters unchanged)

so no `.item()` waits for the GPU between the backward and the update, and the host goes on queuing the next step
while the GPU still runs this one. A skipped step's gradients are clipped too (the host no longer looks at the loss
first); they are zeroed right after, so nothing of them remains. The numbers the step's row needs travel as one fp32
vector [loss_sum, *metric_sums, ||g||, applied] in a `Readback` (lorafuse.training.readback); `StepRecord.row` turns
them into the row the loop logs (loss = loss_sum / U, each metric / U, grad_norm None when the loss is not finite).

Decided on the host instead: a window without units (every label masked: loss NaN, nothing run), and fp16 with a
GradScaler, which reads found-inf and its scale itself (scaler.step, get_scale). There the loss is read first, as a
NaN loss must leave the scaler untouched, and the vector is made from the values read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafuse.training.readback import Readback


@dataclass
class StepRecord:
    """One optimizer step as the loop logs it: what the host knew when it queued the step, and `values`."""

    step: int  # optimizer steps done, this one included (the row's "step")
    epoch: float  # data position after the step's window
    lr: float
    units: int  # U: the window's normalisation units over every rank
    n_input: int
    n_target: int
    tokens: int  # input tokens of the run so far, this step's included
    memory_mb: float
    last: bool  # the run's last step (always logged)
    values: Readback  # [loss_sum, *metric_sums, grad_norm, applied]
    done: object  # a readback.StepClock mark queued after the step's last kernel
    reason: str | None = None  # a skip decided on the host: "nan" or "fp16_overflow"

    def row(self, metric_names: tuple[str, ...]) -> dict:
        """The step's row (loss, lr, grad_norm, units, n_input, the metrics, n_target, skipped); waits for the device
        if it has not finished the step yet."""
        *sums, norm, applied = self.values.get()
        loss_sum, metric_sums, units = sums[0], sums[1:], self.units
        loss = loss_sum / units if units else math.nan
        metrics = {n: (s / units if units else math.nan) for n, s in zip(metric_names, metric_sums)}
        skipped = self.reason or (None if applied else "nan")
        grad_norm = norm if math.isfinite(loss) else None
        row = {"loss": loss, "lr": self.lr, "grad_norm": grad_norm, "units": units, "n_input": self.n_input}
        return {**row, **metrics, "n_target": self.n_target, "skipped": skipped}


def clip_and_step(optimizer, params: list, max_norm: float, sums: torch.Tensor, units: int, scaler=None):
    """Clip the gradients of `params` to `max_norm` and update (or skip, module docstring). `sums`: the window's fp32
    (1 + metrics,) loss and metric sums on the device. Returns (Readback of the step's values, host skip reason)."""
    if not units:
        return Readback(_values(sums.detach().cpu(), math.nan, False)), "nan"
    if scaler is not None:
        return _fp16_step(optimizer, params, max_norm, sums, scaler)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm).to(sums.device)
    applied = torch.isfinite(sums[0]) & torch.isfinite(norm)
    optimizer.step(apply=applied)
    return Readback(_values(sums, norm, applied)), None


def _fp16_step(optimizer, params: list, max_norm: float, sums: torch.Tensor, scaler):
    """The GradScaler's step: unscale, clip, step unless a gradient is inf/NaN (then the scale drops)."""
    host = sums.detach().cpu()
    if not math.isfinite(float(host[0])):
        return Readback(_values(host, math.nan, False)), "nan"
    scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips the update itself when a gradient is inf/NaN
    scaler.update()
    reason = "fp16_overflow" if scaler.get_scale() < scale else None
    return Readback(_values(host, norm, reason is None)), reason


def _values(sums: torch.Tensor, norm, applied) -> torch.Tensor:
    """[*sums, norm, applied] as one fp32 vector on sums' device (norm and applied: 0-dim tensors or numbers)."""
    tail = [torch.as_tensor(x, dtype=torch.float32, device=sums.device).reshape(1) for x in (norm, applied)]
    return torch.cat([sums.detach().float().reshape(-1), *tail])

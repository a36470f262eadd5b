"""What the training loop calls to get a loss: an `Objective`, one file per objective (sft.py, dpo.py, orpo.py).

An objective turns one micro-batch into the SUM of its per-unit losses and the SUM of each of its metrics:

    units(batch)                 -> u_b   normalisation units in the micro-batch (target tokens for SFT, pairs
                                          for DPO/ORPO)
    loss_sum(model, batch, ctx)  -> (L_b, {name: M_b})
                                          L_b = sum of the per-unit losses (fp32 scalar with grad),
                                          M_b = sum of a metric over the units (fp32 scalars, no grad)

`loss_sum` is two halves, so the loop can capture the second in a CUDA graph (lorafuse.training.graphs):
`inputs` (`objective_inputs`, after a preference objective has laid its pairs out) moves the micro-batch to the
device (the model's forward kwargs, "labels", and "ref_logps" where the batch carries precomputed reference
log-probs), and `loss_on_inputs(model, inputs, ctx)` computes the sums from those device tensors alone, without a
host synchronisation.

The loop sums u_b over a step's window of micro-batches (and over ranks) into U and backpropagates L_b / U for each
micro-batch, so gradient accumulation equals one big batch whatever the window holds; it logs
sum_b L_b / U as the loss and sum_b M_b / U as the metric. A new objective is a new file with these two methods
and an entry in `lorafuse.training.objectives.build_objective`; the loop does not change.

`batch` is a micro-batch as `lorafuse.data.collate.Batcher` yields it (CPU tensors, or already on the device): the
objective moves what it reads to `ctx.precision.device` and runs its forwards inside `ctx.precision.autocast()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorafuse.training.distributed import SINGLE
from lorafuse.training.loss import forward_batch
from lorafuse.training.runtime import Precision


@dataclass(frozen=True)
class ObjectiveContext:
    """What a loss needs from the loop: the precision policy (device, autocast), the output head module (the
    AccelState's `head`, `lorafuse.accel.simple_head`; None: the model's own logits) and whether fused CUDA loss
    kernels may run (the AccelState's `fused_loss`)."""

    precision: Precision
    head: nn.Module | None = None
    fused: bool = False


class Objective:
    """The interface every objective implements (`units`, `loss_on_inputs`); `loss_sum` is theirs in common."""

    name: str  # "sft" | "dpo" | "orpo"
    metric_names: tuple[str, ...] = ()  # summed per unit by loss_sum, logged as means over the units

    def units(self, batch: dict) -> int:
        """How many normalisation units the micro-batch holds: target tokens for SFT, pairs for DPO/ORPO."""
        raise NotImplementedError

    def loss_on_inputs(self, model, inputs: dict, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict]:
        """`loss_sum` from the micro-batch's device tensors (`objective_inputs`), capture-safe on CUDA."""
        raise NotImplementedError

    def inputs(self, model, batch: dict, precision: Precision) -> dict:
        """The micro-batch on the device as `loss_on_inputs` reads it (`objective_inputs`)."""
        return objective_inputs(model, batch, precision)

    def loss_sum(self, model, batch: dict, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The SUM of the micro-batch's per-unit losses (fp32 scalar with grad) and the SUM of each metric (fp32
        scalars, no grad)."""
        return self.loss_on_inputs(model, self.inputs(model, batch, ctx.precision), ctx)


def objective_inputs(model, batch: dict, precision: Precision) -> dict:
    """A Batcher micro-batch on the device: the forward kwargs and labels (`lorafuse.training.loss.forward_batch`),
    and "ref_logps" (2B,) fp32 where the batch carries precomputed reference log-probs."""
    if precision.device.type == "cuda":
        batch = _pinned(batch)
    inputs = forward_batch(model, batch, precision)
    if "ref_logps" in batch:
        inputs["ref_logps"] = batch["ref_logps"].to(precision.device, torch.float32, non_blocking=True)
    return inputs


def _pinned(batch: dict) -> dict:
    """The batch's host tensors in pinned memory (the caching host allocator reuses the blocks): a copy from pageable
    memory may make the host wait until the GPU has run everything queued before it, which would stop the training
    loop from queuing the next step while the GPU runs this one (lorafuse.training.loop)."""
    return {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(objective: Objective, model, batches, ctx: ObjectiveContext, world=SINGLE) -> dict[str, float]:
    """{"loss": mean per unit, <metric>: mean per unit, "units": U} over one pass of `batches` (epoch 0; rank
    shares), dropout off. NaN when the split holds no unit."""
    was_training = model.training
    model.eval()
    names = ("loss", *objective.metric_names)
    sums = [0.0] * len(names)
    units = 0
    for batch in world.stride(batches.epoch_batches(0)):
        loss, metrics = objective.loss_sum(model, batch, ctx)
        for k, value in enumerate((loss, *(metrics[n] for n in objective.metric_names))):
            sums[k] += float(value)
        units += objective.units(batch)
    model.train(was_training)
    *sums, units = world.all_reduce_sum([*sums, units], torch.float64)
    return {**{n: (s / units if units else math.nan) for n, s in zip(names, sums)}, "units": int(units)}

"""Supervised fine-tuning: the next-token loss on the target tokens, one unit per target token.

    loss_sum = sum_{targets t} -log p(y_t | y_<t)        units = number of targets (labels != -100 after the shift)

A thin objective over `lorafuse.training.loss` (`lm_loss_sum`: hidden states through the head in chunks, or the fused
CUDA kernel; `count_targets`), so the loop's mean per target token is unchanged. No metrics besides the loss.
"""

from __future__ import annotations

import torch

from lorafuse.training.loss import count_targets, lm_loss_sum
from lorafuse.training.objectives.base import Objective, ObjectiveContext


class SFTObjective(Objective):
    name = "sft"

    def units(self, batch: dict) -> int:
        return count_targets(batch)

    def loss_on_inputs(self, model, inputs: dict, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict]:
        with ctx.precision.autocast():
            return lm_loss_sum(model, inputs, ctx.head, ctx.fused), {}

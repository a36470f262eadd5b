"""Optimizers and learning-rate schedules: AdamW (torch), 8-bit AdamW and paged 8-bit AdamW (ours, optim8bit.py).

AdamW, per element, at step t (1-based), gradient g, decoupled weight decay wd:

    m = b1 m + (1 - b1) g                   v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Schedules (`LRSchedule`): linear warmup for W steps (lr (s+1)/W at 0-based step s), then cosine or linear
decay towards 0 over the remaining steps, or constant. The last step keeps a small positive lr (no step is
wasted at lr 0). `warmup_steps` < 1 is a fraction of all steps (rounded up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lorafuse.training.optim8bit import AdamW8bit, PagedAdamW8bit


def build_optimizer(name: str, params: Iterable, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`adamw` (torch, fp32 states), `adamw_8bit`, `paged_adamw_8bit`."""
    params = list(params)
    if name == "adamw":
        # foreach=False: the single-tensor path gives identical results however params are grouped.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    if name == "adamw_8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        return PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (host or device)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


class LRSchedule:
    """lr at 0-based optimizer step s: warmup then cosine/linear/constant (module docstring)."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: float = 0.0, kind: str = "cosine"):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown scheduler {kind!r}")
        self.base_lr, self.total, self.kind = base_lr, max(1, total_steps), kind
        self.warmup = math.ceil(warmup_steps * self.total) if 0 < warmup_steps < 1 else int(warmup_steps)
        self.warmup = min(self.warmup, self.total)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.base_lr
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return self.base_lr * (1.0 - progress)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "total": self.total, "warmup": self.warmup, "kind": self.kind}

"""Optimizers and learning-rate schedules: AdamW (torch), 8-bit AdamW and paged 8-bit AdamW (ours, optim8bit.py).

AdamW, per element, at step t (1-based), gradient g, decoupled weight decay wd:

    m = b1 m + (1 - b1) g                   v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Every optimizer here takes `step(apply=flag)`, a 0-dim bool device tensor (the training loop's "this step's loss and
gradient norm are finite"): where it is False the step changes nothing, and the host never reads the flag to decide
(lorafuse.training.readback). torch's AdamW is wrapped for it (`AdamW`): its update runs, then every parameter and
state gets back its old value where the flag is False; the step counters are taken back when the flag is read.

Schedules (`LRSchedule`): linear warmup for W steps (lr (s+1)/W at 0-based step s), then cosine or linear
decay towards 0 over the remaining steps, or constant. The last step keeps a small positive lr (no step is
wasted at lr 0). `warmup_steps` < 1 is a fraction of all steps (rounded up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lorafuse.errors import LorafuseError
from lorafuse.lora.token_rows import VALUES_KEY as TOKEN_ROWS_KEY
from lorafuse.model_state import model_state
from lorafuse.training.optim8bit import AdamW8bit, PagedAdamW8bit
from lorafuse.training.readback import CancelledSteps, kept_unless

_MASKED_ELEMENTS = 1 << 22  # AdamW(apply=flag): elements copied at once (48 MiB of fp32 parameter and states)


def build_optimizer(name: str, params: Iterable, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`adamw` (torch, fp32 states), `adamw_8bit`, `paged_adamw_8bit`. `params`: tensors, or param groups (dicts;
    a group's "lr_scale" multiplies the schedule's lr for it, `param_groups`)."""
    params = list(params)
    if name == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw_8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        return PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def param_groups(
    model: torch.nn.Module,
    params: list,
    loraplus_ratio: float = 1.0,
    modules_scale: float = 1.0,
    modules=None,
    token_rows_scale: float = 1.0,
) -> list:
    """`params` as optimizer param groups, each with its "lr_scale" (times the schedule's rate) and "role":
    the rest at 1x; with LoRA+ (Hayou et al. 2024) the adapter's B matrices at `loraplus_ratio` times the rate; the
    modules trained whole (lora.modules_to_save; `modules`: their names, default the ones apply_lora recorded) at
    `modules_scale` times it (train.modules_to_save_lr / train.lr); the trained token rows at `token_rows_scale`
    times it (train.token_rows_lr / train.lr). With every scale 1, the plain list (one group: the optimizer and its
    checkpoints as without any)."""
    if loraplus_ratio == 1 and modules_scale == 1 and token_rows_scale == 1:
        return params
    if modules is None:
        modules = (model_state(model).lora or {}).get("trained_module_names") or []
    prefixes = tuple(f"{m}." for m in modules)
    names = {id(p): n for n, p in model.named_parameters()}

    def role(p) -> str:
        name = names.get(id(p), "")
        if modules_scale != 1 and name.startswith(prefixes):
            return "modules_to_save"
        if token_rows_scale != 1 and name.endswith(TOKEN_ROWS_KEY):
            return "token_rows"
        return "lora_B" if loraplus_ratio != 1 and ".lora_B." in name else "rest"

    scales = {
        "rest": 1.0,
        "lora_B": float(loraplus_ratio),
        "modules_to_save": float(modules_scale),
        "token_rows": float(token_rows_scale),
    }
    roles = [role(p) for p in params]
    groups = [
        {"params": [p for p, r in zip(params, roles) if r == k], "lr_scale": scales[k], "role": k} for k in scales
    ]
    return [g for g in groups if g["params"]]


def check_group_rates(saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint's optimizer state_dict `saved` has `optimizer`'s param groups at the same rates (LoRA+'s B group,
    the modules trained whole), else a LorafuseError: loading it would fail on the group count, or silently keep
    the checkpoint's rates."""
    rates = [[g.get("lr_scale", 1.0) for g in groups] for groups in (saved["param_groups"], optimizer.param_groups)]
    if rates[0] != rates[1]:
        then, now = (_group_rates(groups) for groups in (saved["param_groups"], optimizer.param_groups))
        raise LorafuseError(
            f"the checkpoint's optimizer trained its parameters at {then}, this run at {now}: its optimizer states "
            "belong to the other setting",
            "resume with the checkpoint's train.loraplus_lr_ratio, train.modules_to_save_lr and train.token_rows_lr, "
            "or start a new run in another output.dir",
        )


def _group_rates(groups: list) -> str:
    """How param groups' rates read in an error: "train.lr for all", or each group's role and its multiple."""
    if all(g.get("lr_scale", 1.0) == 1.0 for g in groups):
        return "train.lr for all"
    roles = {
        "rest": "the rest",
        "lora_B": "LoRA+'s B matrices",
        "modules_to_save": "lora.modules_to_save",
        "token_rows": "the token rows",
    }
    # a checkpoint written before groups had roles has LoRA+'s two groups: the rest, then B
    named = [(g.get("role") or ("rest" if k == 0 else "lora_B"), g.get("lr_scale", 1.0)) for k, g in enumerate(groups)]
    return ", ".join(f"{roles[r]} {scale:g}x train.lr" for r, scale in named)


class AdamW(torch.optim.AdamW):
    """torch's AdamW on its single-tensor path (foreach=False: identical results however params are grouped) with
    `step(apply=flag)` (module docstring). The parameters and states of a flagged step are copied before the update
    and restored where the flag is False, a few tensors at a time (at most _MASKED_ELEMENTS elements: their copies
    are the step's only extra memory, 12 bytes an element for fp32), what the fused 8-bit kernels avoid by not
    storing."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.01, **kwargs):
        super().__init__(params, lr=lr, weight_decay=weight_decay, foreach=False, **kwargs)
        self._cancelled = CancelledSteps()

    @torch.no_grad()
    def step(self, closure=None, apply: torch.Tensor | None = None):
        self._cancelled.settle()  # the previous step's counters, before this step's bias corrections use them
        if apply is None:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        try:
            for chunk in _chunks(params, _MASKED_ELEMENTS):
                for p, g in zip(params, grads):  # torch's step updates the tensors with a gradient: this chunk
                    p.grad = g if id(p) in chunk else None
                self._masked_step([p for p in params if id(p) in chunk], apply)
        finally:
            for p, g in zip(params, grads):
                p.grad = g
        self._cancelled.record(apply, [self.state[p] for p in params])
        return loss

    def _masked_step(self, params: list, apply: torch.Tensor) -> None:
        """torch's step of `params` (the only ones with a gradient now), undone where `apply` is False."""
        fresh = [p for p in params if not self.state[p]]  # torch makes their (zero) states inside the step
        known = [p for p in params if self.state[p]]
        with kept_unless(apply, [*params, *(t for p in known for t in _moments(self.state[p]))]):
            super().step()
        for p in fresh:  # a cancelled first step leaves the zero states torch made
            for t in _moments(self.state[p]):
                t.copy_(torch.where(apply, t, torch.zeros_like(t)))

    def state_dict(self):
        self._cancelled.settle()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._cancelled.forget()
        super().load_state_dict(state_dict)


def _chunks(params: list, limit: int) -> list[set]:
    """Consecutive groups of params (as sets of ids) of at most `limit` elements each (a larger tensor alone)."""
    groups, size = [set()], 0
    for p in params:
        if groups[-1] and size + p.numel() > limit:
            groups.append(set())
            size = 0
        groups[-1].add(id(p))
        size += p.numel()
    return groups


def _moments(state: dict) -> list[torch.Tensor]:
    """An AdamW state's tensors other than its step counter (exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad)."""
    return [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]


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
        """Set each param group's lr for `step` (times the group's "lr_scale", LoRA+'s); returns the schedule's lr."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "total": self.total, "warmup": self.warmup, "kind": self.kind}

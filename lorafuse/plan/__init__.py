"""Memory planner: predict a training step's GPU memory and speed from config.json alone.

    from lorafuse.plan import plan, suggest, next_smaller
    p = plan(cfg, gpu_memory="15GiB")      # Plan: components, peak, fits, suggestion
    suggest(cfg, "15GiB")                  # {"train.micro_batch_size": 2, "train.grad_accum": 8}
    next_smaller(cfg)                      # after an OOM: the next smaller setting, or None

shapes.py (model shapes), workload.py (what a prediction depends on, from a config), memory.py (the byte
accounting and its derivation) with activations.py (what a layer saves) and placement.py (what leaves the GPU),
policy.py (the decisions the runtime makes too), speed.py (cards, step time), fit.py (the search), cli.py
(`lorafuse plan`).
"""

from lorafuse.plan.fit import Plan, apply_overrides, next_smaller, plan, suggest
from lorafuse.plan.memory import estimate, nf4_bytes
from lorafuse.plan.shapes import ModelShape, builtin_names, builtin_shape, load_shape
from lorafuse.plan.workload import Workload


def plan_cli(cfg, gpu_memory=None, as_json=False) -> int:
    """Alias of `lorafuse.plan.cli.plan_command` (the name the contracts list)."""
    from lorafuse.plan.cli import plan_command

    return plan_command(cfg, gpu_memory=gpu_memory, as_json=as_json)


__all__ = [
    "Plan",
    "Workload",
    "ModelShape",
    "plan",
    "suggest",
    "next_smaller",
    "apply_overrides",
    "estimate",
    "nf4_bytes",
    "load_shape",
    "builtin_shape",
    "builtin_names",
    "plan_cli",
]

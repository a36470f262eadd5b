"""The lean setting of the 7B benchmarks as a planner Workload, for the tests that price a placement against it."""

from __future__ import annotations

from lorafuse.plan.shapes import builtin_shape
from lorafuse.plan.workload import Workload


def lean_workload(shape: str, batch: int, seq: int, checkpointing: str = "offload", **kw) -> Workload:
    """Fused kernels and loss, CUDA graphs, one micro-batch a step, no padding and no dropout."""
    return Workload(
        builtin_shape(shape),
        micro_batch=batch,
        seq=seq,
        kernels="fused",
        loss="fused",
        checkpointing=checkpointing,
        dropout=0.0,
        grad_accum=1,
        cuda_graphs=True,
        padded=False,
        **kw,
    )

"""Where lorafuse's Triton kernels run, and how they are launched.

Every public op in this package takes the Triton path for CUDA tensors and the PyTorch reference
(`reference.py`) for CPU tensors. The one exception is the test suite: with `TRITON_INTERPRET=1` set
before the kernel modules are imported, Triton decorates kernels for its CPU interpreter, and
`cpu_kernels()` lets CPU tensors take the kernel path so the same code is checked without a GPU.

`tuned(...)` wraps a kernel in `triton.autotune` on a GPU and in one fixed small configuration under
the interpreter (autotuning there would time numpy loops, for nothing). LORAFUSE_AUTOTUNE=0 launches
each kernel with one fixed GPU configuration instead of autotuning (a quick correctness run on a GPU:
no per-shape benchmarking; the numbers are then not the tuned ones).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

try:
    import triton

    HAS_TRITON = True
except ImportError:  # macOS / Windows CPU installs: the reference path is the product
    triton = None
    HAS_TRITON = False

TRITON_VERSION = triton.__version__ if HAS_TRITON else ""  # recorded beside benchmark numbers
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("LORAFUSE_AUTOTUNE", "1") != "0"
_CPU_KERNELS = False


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on `t` should run the Triton kernel rather than the reference."""
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return INTERPRET and _CPU_KERNELS and t.device.type == "cpu"


@contextlib.contextmanager
def cpu_kernels(enabled: bool = True):
    """Run the interpreted Triton kernels on CPU tensors inside this block (tests only)."""
    global _CPU_KERNELS
    if enabled and not INTERPRET:
        raise RuntimeError("cpu_kernels() needs TRITON_INTERPRET=1 set before lorafuse.kernels is imported")
    old, _CPU_KERNELS = _CPU_KERNELS, enabled
    try:
        yield
    finally:
        _CPU_KERNELS = old


_RECOMPUTE = threading.local()


@contextlib.contextmanager
def recomputing():
    """Marks a gradient checkpoint's recompute (train/runtime.py's `checkpoint_function`, train/offload.py).

    Inside it a fused op may skip work whose result the backward never reads: the fused MLP leaves out the down
    projection's base GEMM (swiglu_mlp.py), whose output only feeds the residual sum. Per thread: the autograd
    engine runs a recompute on its own thread, while another thread may be in a plain forward."""
    depth = getattr(_RECOMPUTE, "depth", 0)
    _RECOMPUTE.depth = depth + 1
    try:
        yield
    finally:
        _RECOMPUTE.depth = depth


def in_recompute() -> bool:
    return getattr(_RECOMPUTE, "depth", 0) > 0


class _Fixed:
    """A kernel launched with one fixed meta-parameter set (the interpreter's stand-in for autotune)."""

    def __init__(self, fn, meta: dict):
        self.fn, self.meta = fn, meta

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **self.meta)

        return launch


def tuned(configs: list, key: list[str], interpret_meta: dict, fixed: int = -1, **autotune_kwargs):
    """Decorator: `triton.autotune(configs, key)` on a GPU, `interpret_meta` under the interpreter,
    `configs[fixed]` (one that fits fp32 tiles too) when LORAFUSE_AUTOTUNE=0."""

    def wrap(fn):
        if INTERPRET:
            return _Fixed(fn, interpret_meta)
        if not AUTOTUNE:
            c = configs[fixed]
            return _Fixed(fn, {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
        return triton.autotune(configs=configs, key=key, **autotune_kwargs)(fn)

    return wrap


def autocast_off(fn):
    """For an autograd Function's forward/backward: run with autocast disabled on the tensors' device.

    The fused ops choose every GEMM's dtype themselves (the compute dtype is x.dtype); autocast would
    re-cast some operands and not others (out= and in-place calls are not autocast)."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)

    return wrapper


def dot_precision(dtype: torch.dtype) -> str | None:
    """`tl.dot` input precision: exact fp32 for fp32 operands (never silent TF32), the default otherwise."""
    return "ieee" if dtype == torch.float32 else None

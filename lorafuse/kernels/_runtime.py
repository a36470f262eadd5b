"""Where lorafuse's Triton kernels run, and how they are launched.

Every public op in this package takes the Triton path for CUDA tensors and the PyTorch reference
(`reference.py`) for CPU tensors. The one exception is the test suite: with `TRITON_INTERPRET=1` set
before the kernel modules are imported, Triton decorates kernels for its CPU interpreter, and
`cpu_kernels()` lets CPU tensors take the kernel path so the same code is checked without a GPU.

`tuned(...)` wraps a kernel in `triton.autotune` on a GPU and in one fixed small configuration under
the interpreter (autotuning there would time numpy loops, for nothing).
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


_MARKS = threading.local()  # per thread: the autograd engine runs a recompute on its own thread


@contextlib.contextmanager
def _mark(name: str):
    depth = getattr(_MARKS, name, 0)
    setattr(_MARKS, name, depth + 1)
    try:
        yield
    finally:
        setattr(_MARKS, name, depth)


def recomputing():
    """Marks a gradient checkpoint's recompute (train/runtime.py's `checkpoint_function`, train/offload.py).

    Inside it a fused op may skip work whose result the backward never reads: the fused MLP leaves out the down
    projection's base GEMM (swiglu_mlp.py), whose output only feeds the residual sum."""
    return _mark("recompute")


def checkpointed_forward():
    """Marks the forward of a checkpointed layer (train/runtime.py's `checkpoint_function`): what it saves for
    backward is dropped and recomputed later, so a fused op may overwrite its own intermediates (the fused MLP
    writes SwiGLU's product over the gate output)."""
    return _mark("forward")


def in_recompute() -> bool:
    return getattr(_MARKS, "recompute", 0) > 0


def in_checkpointed_forward() -> bool:
    return getattr(_MARKS, "forward", 0) > 0


class _Fixed:
    """A kernel launched with one fixed meta-parameter set (the interpreter's stand-in for autotune)."""

    def __init__(self, fn, meta: dict):
        self.fn, self.meta = fn, meta

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **self.meta)

        return launch


def tuned(configs: list, key: list[str], interpret_meta: dict, **autotune_kwargs):
    """Decorator: `triton.autotune(configs, key)` on a GPU, `interpret_meta` under the interpreter."""

    def wrap(fn):
        if INTERPRET:
            return _Fixed(fn, interpret_meta)
        return triton.autotune(configs=configs, key=key, **autotune_kwargs)(fn)

    return wrap


_FP32_OUT: dict = {}


def gemm_fp32_out(device: torch.device) -> bool:
    """Can this CUDA device's torch write a 16-bit GEMM's fp32 accumulator straight out (`torch.mm(a, b,
    out_dtype=torch.float32)`, and addmm's with alpha and beta = 0, cuBLAS; torch >= 2.8)? Probed once per device on
    a tiny product, checked against the fp32 one; False on a CPU or where a call is missing or wrong."""
    key = str(device)
    if key not in _FP32_OUT:
        ok = False
        if torch.device(device).type == "cuda":
            try:
                a = torch.arange(24, dtype=torch.float32, device=device).view(4, 6).div_(7)
                b = torch.arange(30, dtype=torch.float32, device=device).view(6, 5).div_(5)
                a16, b16 = a.bfloat16(), b.bfloat16()
                want = a16.float() @ b16.float()
                got = torch.mm(a16, b16, out_dtype=torch.float32)
                out = torch.full_like(want, float("nan"))  # beta = 0 must not read it
                torch.addmm(out, a16, b16, out_dtype=torch.float32, beta=0, alpha=2.0, out=out)
                ok = (
                    got.dtype == out.dtype == torch.float32
                    and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
                    and torch.allclose(out, 2 * want, rtol=1e-5, atol=1e-5)
                )
            except (RuntimeError, TypeError):
                ok = False
        _FP32_OUT[key] = ok
    return _FP32_OUT[key]


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


def rank_block(r: int) -> int:
    """The block that holds a LoRA rank r in one tile: `tl.dot` needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    """The autotuning key of a token count: a power of two, so a kernel tunes once per bucket, not per batch."""
    return triton.next_power_of_2(max(m, 16))

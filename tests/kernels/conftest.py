"""Kernel tests run the Triton kernels themselves: on a GPU when there is one, else in Triton's CPU
interpreter (TRITON_INTERPRET=1 must be set before lorafuse.kernels is imported, hence here).

Interpreter rules: tiny shapes (numpy runs every program), fp32/fp16 only (the interpreter's bf16
`tl.dot` and bf16 casts are wrong); bf16 and real shapes are the `gpu`-marked tests.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lorafuse.kernels import _runtime  # noqa: E402  (after the env var, on purpose)


@pytest.fixture(autouse=True)
def _kernels_on_cpu():
    """Send CPU tensors to the interpreted kernels for the duration of each kernel test."""
    if torch.cuda.is_available() or not _runtime.INTERPRET:
        yield
        return
    with _runtime.cpu_kernels():
        yield


@pytest.fixture
def device():
    """Where the small parity tests run: the GPU if present, else the interpreter on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not (_runtime.HAS_TRITON and _runtime.INTERPRET):
        pytest.skip("lorafuse.kernels was imported before TRITON_INTERPRET=1; run tests/kernels on its own")
    return torch.device("cpu")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error ||got - want|| / ||want|| in fp64 (Frobenius)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.fixture
def parity():
    """The DESIGN rule 2 assertion, as a fixture (test modules here are not a package)."""
    return assert_close_to_oracle


def assert_close_to_oracle(
    name: str,
    kernel: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    oracle: torch.Tensor,
    factor: float = 2.0,
    floor: float | None = None,
) -> None:
    """DESIGN rule 2: the kernel's error vs the fp32 oracle is at most `factor` times the error of the
    reference computed in the kernel's dtype. `floor` is the dtype's unit roundoff scale, used only when
    the same-dtype reference is exact (e.g. fp32 vs fp32), so a bit-identical reference cannot demand
    a bit-identical kernel."""
    e_kernel = rel_err(kernel, oracle)
    e_ref = rel_err(ref_same_dtype, oracle)
    bound = factor * max(e_ref, floor if floor is not None else _eps(kernel.dtype))
    assert e_kernel <= bound, f"{name}: kernel err {e_kernel:.3e} > {factor} x ref err {e_ref:.3e} (bound {bound:.3e})"


def _eps(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)

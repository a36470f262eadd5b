"""NF4 dequantization: the Triton kernel equals NF4Weight.dequantize() bit for bit (DESIGN rule 3)."""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels.nf4_dequant import dequantize_to_buffer, nf4_absmax, nf4_dequantize
from lorafuse.kernels.reference import nf4_dequantize_reference
from lorafuse.quant.nf4 import quantize_nf4

# aligned; odd element count (half-filled last byte) with a partial last block; blocks straddling rows
SHAPES = [(64, 128), (37, 53), (5, 96)]


def _weight(shape, device, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02 + torch.randn(shape[-1], generator=g) * 0.01  # per-column bias
    return quantize_nf4(w.to(device), blocksize=blocksize, double_quant=double_quant)


def _cpu_dtypes():
    # the interpreter casts fp32 -> bf16 by truncation, so bf16 bit-exactness is a GPU test
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_dequant_bit_exact(device, shape, double_quant, blocksize):
    w = _weight(shape, device, blocksize, double_quant)
    for dtype in _cpu_dtypes():
        got = nf4_dequantize(w, dtype)
        want = w.dequantize(dtype)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(got, want), f"{dtype}: {int((got != want).sum())} of {want.numel()} weights differ"


def test_absmax_bit_exact(device):
    w = _weight((300, 64), device)  # 300 blocks: two nested blocks, the second partial
    assert torch.equal(nf4_absmax(w), w.absmax_fp32())


def test_reference_decoder_equals_nf4weight():
    """The spec decoder in reference.py (the CPU path) and the quant module's agree exactly."""
    for shape in SHAPES:
        w = _weight(shape, "cpu")
        assert torch.equal(nf4_dequantize_reference(w, torch.float32), w.dequantize(torch.float32))


def test_buffer_is_reused_and_exact(device):
    big, small = _weight((64, 96), device, seed=1), _weight((37, 53), device, seed=2)
    first = dequantize_to_buffer(big, torch.float16)
    assert torch.equal(first, big.dequantize(torch.float16))
    second = dequantize_to_buffer(small, torch.float16)
    assert second.data_ptr() == first.data_ptr(), "the smaller weight must reuse the buffer"
    assert torch.equal(second, small.dequantize(torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 14336), (4097, 4095)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_bit_exact_gpu(shape, dtype):
    w = _weight(shape, "cuda")
    assert torch.equal(nf4_dequantize(w, dtype), w.dequantize(dtype))
    assert torch.equal(nf4_absmax(w), w.absmax_fp32())

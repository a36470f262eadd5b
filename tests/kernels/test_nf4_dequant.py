"""NF4 dequantization: the Triton kernel equals NF4Weight.dequantize() bit for bit (DESIGN rule 3)."""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels import nf4_dequant
from lorafuse.kernels.nf4_dequant import nf4_absmax, nf4_dequantize
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


def _shapes_for(config):
    """Per launch configuration: two whole programs (the unmasked kernel), a program and a half with an odd n
    (masked tail, half-filled last byte), and an odd n whose bytes still fill whole programs."""
    block = config.block
    return [(4 * block // 128, 128), (3 * block // 64 + 1, 65), (1, 4 * block - 1)]


def _decode(w, dtype, config):
    """`config`'s decode into a buffer 64 elements longer than the weight, pre-filled with NaN."""
    n = w.shape.numel()
    buf = torch.full((n + 64,), float("nan"), dtype=dtype, device=w.device)
    nf4_dequant._launch(w, buf[:n], config=config)
    return buf[:n].view(w.shape), buf[n:]


@pytest.mark.parametrize("config", nf4_dequant.SWEEP, ids=str)
# blocksize 32: rows of 16 bytes (narrower than vec=16); 4096: one quantization block spans several programs
@pytest.mark.parametrize(
    ("blocksize", "double_quant"), [(64, True), (64, False), (128, True), (32, False), (4096, True)]
)
def test_every_launch_config_is_bit_exact(device, config, blocksize, double_quant):
    for i, shape in enumerate(_shapes_for(config)):
        w = _weight(shape, device, blocksize, double_quant, seed=i)
        for dtype in _cpu_dtypes():
            got, past_end = _decode(w, dtype, config)
            want = w.dequantize(dtype)
            assert torch.equal(got, want), f"{shape} {dtype}: {int((got != want).sum())} of {want.numel()} differ"
            assert past_end.isnan().all(), f"{shape} {dtype}: wrote past the last weight"


def test_default_config_is_swept():
    assert nf4_dequant.DEFAULT in nf4_dequant.SWEEP and nf4_dequant.BYTEWISE in nf4_dequant.SWEEP
    assert len({str(c) for c in nf4_dequant.SWEEP}) == len(nf4_dequant.SWEEP), "names key the benchmark's rows"


@pytest.mark.parametrize("field", [dict(block=1000), dict(vec=3)])
def test_launch_config_rejects_non_powers_of_two(field):
    with pytest.raises(ValueError, match="power of two"):
        nf4_dequant.LaunchConfig(**{"block": 1024, "num_warps": 4, **field})


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 14336), (4097, 4095)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_bit_exact_gpu(shape, dtype):
    w = _weight(shape, "cuda")
    assert torch.equal(nf4_dequantize(w, dtype), w.dequantize(dtype))
    assert torch.equal(nf4_absmax(w), w.absmax_fp32())


@pytest.mark.gpu
@pytest.mark.parametrize("config", nf4_dequant.SWEEP, ids=str)
# unmasked; odd n with bytes filling whole programs (2**23); a partial last program
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4097, 4095), (1000, 4100)])
def test_every_launch_config_is_bit_exact_gpu(config, shape):
    w = _weight(shape, "cuda")
    for dtype in (torch.bfloat16, torch.float16):
        got, past_end = _decode(w, dtype, config)
        assert torch.equal(got, w.dequantize(dtype)), f"{dtype}"
        assert past_end.isnan().all()

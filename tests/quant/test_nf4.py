"""NF4 quantization: byte-equal to bitsandbytes' reference path, decoded per the format spec.

References used here:
  * bitsandbytes' reference kernels (`bitsandbytes/backends/default/ops.py`), called through the torch op
    dispatcher with the CompositeExplicitAutograd key. They are wrapped in torch.compile; we run them eagerly
    (dynamo disabled) because compiling costs ~10 s per shape on CPU and computes the same fp32 ops.
  * `bitsandbytes.functional.quantize_4bit` itself: on CPU it has no native kernel and runs the reference
    kernel, but its double-quant step runs bnb's native CPU `quantize_blockwise`, which is checked separately.
  * `spec_decode`: an independent per-element numpy decoder written from the format definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorafuse.errors import ConfigError, ModelError
from lorafuse.quant.nf4 import DYNAMIC_MAP_SIGNED, NF4_CODE, NF4Weight, dequantize_nf4, double_quantize, quantize_nf4

BF = pytest.importorskip("bitsandbytes.functional")
REF = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(128, 64), (96, 64), (64, 96), (33, 47), (1, 7), (300,), (257, 130)]


def random_weight(shape, dtype, scale=0.02, seed=0, device="cpu"):
    """randn * scale, rows scaled by a log-normal factor so blocks (and double-quant blocks) differ."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    if len(shape) == 2:
        w = w * torch.exp(torch.randn(shape[0], 1, generator=g))
    return w.to(device=device, dtype=dtype)


def bnb_reference_quantize(w, blocksize, double_quant):
    """The steps of bnb.functional.quantize_4bit, every kernel taken from bnb's reference backend."""
    with torch._dynamo.config.patch(disable=True):
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default.redispatch(REF, w, blocksize, "nf4", torch.uint8)
        out = {"packed": packed, "absmax": absmax}
        if double_quant:
            offset = absmax.mean()
            code = BF.create_dynamic_map().to(w.device)
            codes, nested = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
                REF, absmax - offset, code, 256
            )
            out.update(absmax=codes, nested_absmax=nested, offset=offset.item())
    return out


def bnb_reference_dequantize(q):
    """bnb's reference dequantization (dequantize_blockwise + offset, then dequantize_4bit) of our NF4Weight."""
    with torch._dynamo.config.patch(disable=True):
        absmax = q.absmax
        if q.double_quant:
            absmax = (
                torch.ops.bitsandbytes.dequantize_blockwise.default.redispatch(
                    REF, q.absmax, q.nested_absmax, q.nested_code, 256, torch.float32
                )
                + q.offset
            )
        return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
            REF, q.packed.view(-1, 1), absmax, q.blocksize, "nf4", list(q.shape), q.dtype
        )


def spec_decode(q):
    """Per element i: code[nibble i] * absmax[i // blocksize]; nibble 2k = high half of byte k.
    Double quant: absmax[b] = nested_code[u8[b]] * nested_absmax[b // 256] + offset. All fp32, then cast."""
    code = BF.get_4bit_type("nf4", device="cpu").numpy()
    n = math.prod(q.shape)
    i = np.arange(n)
    byte = q.packed.cpu().numpy()[i // 2]
    nibble = np.where(i % 2 == 0, byte >> 4, byte & 0x0F)
    if q.double_quant:
        b = np.arange(q.absmax.numel())
        absmax = q.nested_code.cpu().numpy()[q.absmax.cpu().numpy()] * q.nested_absmax.cpu().numpy()[b // 256]
        absmax = absmax + np.float32(q.offset)
    else:
        absmax = q.absmax.cpu().numpy()
    values = code[nibble] * absmax[i // q.blocksize]
    assert values.dtype == np.float32
    return torch.from_numpy(values).reshape(q.shape).to(q.dtype)


def assert_equals_bnb(w, q, blocksize, double_quant):
    ref = bnb_reference_quantize(w, blocksize, double_quant)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(q.packed, ref["packed"].view(-1))
    assert torch.equal(q.absmax, ref["absmax"])
    assert q.double_quant == double_quant
    if double_quant:
        assert q.absmax.dtype == torch.uint8
        assert torch.equal(q.nested_absmax, ref["nested_absmax"])
        assert q.offset == ref["offset"]
    deq = q.dequantize()
    assert deq.dtype == w.dtype and deq.shape == w.shape
    assert torch.equal(deq, bnb_reference_dequantize(q))
    assert torch.equal(deq, spec_decode(q).to(deq.device))
    return deq


def test_tables_equal_bitsandbytes():
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP_SIGNED, BF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_bnb_reference(shape, dtype, double_quant):
    w = random_weight(shape, dtype, scale=0.02 if dtype != torch.float16 else 3.0, seed=len(shape) + shape[0])
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    deq = assert_equals_bnb(w, q, 64, double_quant)
    # Nearest-code rounding: the error is at most half the widest NF4 gap (0.72..1.0) times the block scale.
    scale = q.absmax_fp32().repeat_interleave(64)[: w.numel()].view(w.shape)
    half_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2
    err = (deq.float() - w.float()).abs()
    if dtype == torch.float32 and not double_quant:
        assert bool((err <= half_gap * scale * (1 + 2**-20)).all())
    print(
        f"{shape} {dtype} dq={double_quant}: ours vs bnb max diff 0.0; quantization error max |w-deq|/absmax "
        f"{(err / scale).max():.4f}"
    )


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_other_blocksizes_equal_bnb_reference(blocksize, double_quant):
    w = random_weight((40, 300), torch.bfloat16, scale=0.5, seed=blocksize)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert q.blocksize == blocksize and q.absmax.numel() == math.ceil(12000 / blocksize)
    assert_equals_bnb(w, q, blocksize, double_quant)


def test_public_quantize_4bit_on_cpu():
    """bnb.functional.quantize_4bit on CPU: the 4-bit step IS the reference kernel; its double-quant step uses
    bnb's native CPU quantize_blockwise, which sometimes picks a farther 8-bit code. Ours is always nearest."""
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::quantize_4bit", "CPU")
    w = random_weight((1024, 512), torch.bfloat16, seed=7)  # 8192 blocks: 32 full nested blocks
    q = quantize_nf4(w, 64, double_quant=False)
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)

    q = quantize_nf4(w, 64, double_quant=True)
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.nested_absmax, state.state2.absmax) and q.offset == state.offset.item()
    absmax = quantize_nf4(w, 64, double_quant=False).absmax
    scaled = ((absmax - q.offset).view(-1, 256) * (1 / q.nested_absmax).view(-1, 1)).view(-1).double()
    code = DYNAMIC_MAP_SIGNED.double()
    ours_dist = (scaled - code[q.absmax.long()]).abs()
    native_dist = (scaled - code[state.absmax.long()]).abs()
    differ = q.absmax != state.absmax
    print(f"bnb native CPU double-quant codes differing from the reference: {int(differ.sum())} of {differ.numel()}")
    assert bool((ours_dist <= native_dist).all())
    assert torch.equal(q.dequantize(), spec_decode(q))


def test_exact_thresholds_go_to_the_lower_code():
    """A value exactly on a midpoint (code[k] + code[k+1]) / 2 takes code k; one ulp above takes k + 1."""
    code = BF.get_4bit_type("nf4", device="cpu")
    mid = (code[:-1] + code[1:]) / 2
    up = torch.nextafter(mid, torch.tensor(2.0))
    down = torch.nextafter(mid, torch.tensor(-2.0))
    k = torch.arange(15, dtype=torch.uint8)
    for absmax in (1.0, 2.0, 0.25):  # powers of two: x * (1 / absmax) is exact, so s is exactly the midpoint
        values = torch.cat([torch.tensor([1.0]), mid, up, down, torch.full((18,), 0.3)]) * absmax
        fill = torch.full((18,), 11, dtype=torch.uint8)  # 0.3 lies between midpoints 10 (0.292) and 11 (0.389)
        expected = torch.cat([torch.tensor([15], dtype=torch.uint8), k, k + 1, k, fill])
        q = quantize_nf4(values, blocksize=64, double_quant=False)
        nibbles = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)
        assert torch.equal(nibbles, expected)
        assert_equals_bnb(values, q, 64, False)


def test_odd_length_pads_the_last_low_nibble_with_the_zero_code():
    w = random_weight((7,), torch.float32, scale=1.0, seed=3)
    q = quantize_nf4(w, 64, double_quant=False)
    assert q.packed.numel() == 4 and int(q.packed[-1] & 15) == 7  # NF4 code 7 is 0.0
    assert_equals_bnb(w, q, 64, False)


def test_bits_per_parameter_4096x4096():
    """QLoRA paper: 4.5 bits/param without double quant, ~4.127 with it (blocksize 64, nested 256)."""
    w = random_weight((4096, 4096), torch.bfloat16, seed=11)
    n = w.numel()
    plain = quantize_nf4(w, 64, double_quant=False).bits_per_param()
    dq = quantize_nf4(w, 64, double_quant=True).bits_per_param()
    # From the format: 4-bit codes + one fp32 absmax per 64 elements ...
    assert plain == (n // 2 + 4 * (n // 64)) * 8 / n == 4 + 32 / 64
    # ... or one uint8 code per 64 elements + one fp32 per 256 blocks + one fp32 offset per tensor.
    assert dq == (n // 2 + n // 64 + 4 * (n // 64 // 256) + 4) * 8 / n
    assert round(dq, 3) == round(4 + 8 / 64 + 32 / (64 * 256), 3) == 4.127
    print(f"bits/param 4096x4096: {plain} without double quant, {dq:.6f} with double quant")


def test_chunked_quantization_plus_double_quantize_equals_whole():
    """Blocks are independent: chunks aligned to 2 * blocksize, then one double_quantize, give the same bytes."""
    w = random_weight((130, 257), torch.bfloat16, seed=9)  # 33410 elements: odd tail block
    whole = quantize_nf4(w, 64, double_quant=True)
    flat, cut = w.reshape(-1), 128 * 100
    parts = [quantize_nf4(flat[:cut], 64, False), quantize_nf4(flat[cut:], 64, False)]
    joined = NF4Weight(
        packed=torch.cat([p.packed for p in parts]),
        absmax=torch.cat([p.absmax for p in parts]),
        shape=w.shape,
        dtype=w.dtype,
        blocksize=64,
    )
    dq = double_quantize(joined)
    assert torch.equal(dq.packed, whole.packed) and torch.equal(dq.absmax, whole.absmax)
    assert torch.equal(dq.nested_absmax, whole.nested_absmax) and dq.offset == whole.offset
    with pytest.raises(ValueError, match="already"):
        double_quantize(dq)


def test_dequantize_dtype_and_to():
    w = random_weight((64, 96), torch.bfloat16, seed=5)
    q = quantize_nf4(w)
    assert dequantize_nf4(q).dtype == torch.bfloat16
    full = dequantize_nf4(q, torch.float32)
    assert torch.equal(full.to(torch.bfloat16), q.dequantize())  # fp32 math, one cast at the end
    moved = q.to("cpu")
    assert moved is not q and moved.device == torch.device("cpu") and torch.equal(moved.dequantize(), q.dequantize())


def test_bad_inputs_raise_clear_errors():
    w = random_weight((64, 64), torch.float32)
    for blocksize in (16, 48, 8192):
        with pytest.raises(ConfigError, match="blocksize"):
            quantize_nf4(w, blocksize=blocksize)
    with pytest.raises(ValueError):
        quantize_nf4(w.view(4, 16, 64))
    with pytest.raises(TypeError):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        quantize_nf4(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_equals_bnb_reference_and_bnb_cuda_decodes_ours(double_quant):
    for shape, dtype in [((4096, 4096), torch.bfloat16), ((257, 130), torch.float16), ((33, 47), torch.float32)]:
        w = random_weight(shape, dtype, seed=1, device="cuda")
        q = quantize_nf4(w, 64, double_quant)
        assert q.device.type == "cuda"
        deq = assert_equals_bnb(w, q, 64, double_quant)
        # bnb's own CUDA kernels decode our bytes to the same values.
        _, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        state.absmax = q.absmax
        if double_quant:
            state.state2.absmax, state.offset = q.nested_absmax, torch.tensor(q.offset, device="cuda")
        assert torch.equal(BF.dequantize_4bit(q.packed.view(-1, 1), state), deq)
        assert torch.equal(q.to("cpu").dequantize(), deq.cpu())

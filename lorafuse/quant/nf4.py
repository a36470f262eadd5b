"""NF4 (4-bit NormalFloat) blockwise quantization, byte-compatible with bitsandbytes 0.50 (`quant_type="nf4"`).

Math (a weight W of n = numel elements, taken FLAT in row-major order; blocks do not follow rows):

    block b        = elements [b*bs, (b+1)*bs) of W.flatten(), bs = blocksize (64 default; 32..4096, powers
                     of two); the last block is partial when n % bs != 0.   n_blocks = ceil(n / bs)
    absmax[b]      = max |W_block| in fp32 (16-bit inputs are cast to fp32 first, which is exact)
    s              = W_i * (1 / absmax[b])  on full blocks, W_i / absmax[b] on the partial last block,
                     clamped to [-1, 1]  (bitsandbytes' reference path does exactly this; absmax is
                     clamped to >= 1e-38 before dividing, and the stored absmax of a partial block too)
    q_i            = index of the nearest NF4_CODE entry = bucketize(s, midpoints), midpoints m_k =
                     (code[k] + code[k+1]) / 2 in fp32; a value exactly on m_k takes the LOWER code k
    dequant        W'_i = NF4_CODE[q_i] * absmax[i // bs]   (fp32 multiply, then cast to the output dtype)

Double quantization (QLoRA's "double quant", bitsandbytes `compress_statistics=True`):

    offset         = mean(absmax)  (fp32)
    absmax - offset is quantized like above with blocksize 256 and the 256-entry signed dynamic map
    DYNAMIC_MAP_SIGNED instead of NF4_CODE:  absmax_u8 (n_blocks,) uint8 codes, nested_absmax
    (ceil(n_blocks / 256),) fp32 = max |absmax - offset| per 256-block
    absmax[b]      = nested_code[absmax_u8[b]] * nested_absmax[b // 256] + offset   (fp32)

Byte layout (what bitsandbytes stores; `packed` is flat here, ((n+1)//2, 1) in bnb's tensors and on disk):

    packed[k] = (q[2k] << 4) | q[2k+1]  uint8 -- element 2k in the HIGH nibble, 2k+1 in the LOW nibble;
                for odd n the last low nibble encodes a padded 0.0, i.e. NF4 code 7 (0b0111)

Storage per parameter: 4 bits + 32 bits per block (4.5 bits at bs=64) or, double-quantized, 4 + 8/64 +
32/(64*256) bits plus one fp32 offset per tensor (about 4.127 bits). The two code tables are shared constants.

Dtype policy: inputs fp32 / bf16 / fp16; all math in fp32; `dequantize` returns the original dtype unless told
otherwise. The same torch code runs on CPU and CUDA; nothing here loops over blocks in Python.

We reproduce bitsandbytes' reference torch path (`backends/default/ops.py`) bit for bit, on CPU and CUDA. bnb's
other paths differ from that reference in rare values (measured with 0.50.2): its native CPU `quantize_blockwise`
(the double-quant step when bnb runs on CPU) picks a farther 8-bit code for 0.1-0.4% of absmax values; its CUDA
4-bit kernel compares against decimal thresholds up to 1 ulp away from the fp32 midpoints, so a value sitting on
a midpoint rounds up there (~4 nibbles in 16.8M for fp32 input, none seen for bf16/fp16). Every path decodes
the same bytes to the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafuse.errors import ConfigError, ModelError

# bitsandbytes `get_4bit_type("nf4")`: quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def _dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, op for op.

    For exponent i = 0..6: 2**i linearly spaced fractions (midpoints of linspace(0.1, 1, 2**i + 1)) times
    10**(i-6), both signs; plus 0 and 1.0. Same fp32 ops as bnb so every entry is bit-identical.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP_SIGNED = _dynamic_map_signed()

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ConfigError(
            f"NF4 blocksize {blocksize!r} is not supported; bitsandbytes' NF4 format takes a power of two "
            f"from 32 to 4096",
            f"set model.blocksize to 64 (the default, QLoRA's choice) or one of {list(VALID_BLOCKSIZES)}",
        )


def _blockwise_codes(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code indices of flat fp32 `x` scaled per block, and the per-block absmax (bnb's reference path).

    Returns (q: int32 (n_blocks * blocksize,), zero-padded tail quantized as 0.0; absmax: fp32 (n_blocks,)).
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    rem = n % blocksize
    if rem:
        x = F.pad(x, (0, blocksize - rem))  # zeros leave max|x| unchanged
    blocks = x.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * torch.reciprocal(absmax.clamp(min=1e-38)).unsqueeze(1)
    if rem:
        # bnb divides (not multiplies by the reciprocal) in the partial block and stores its clamped absmax;
        # the two can differ by one ulp, which can move a value across a threshold.
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    # bnb clamps s to [-1, 1] first; that cannot change the bucket (|s| <= 1 + 1 ulp), so we skip the pass.
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled.view(-1), midpoints, out_int32=True), absmax  # right=False: ties -> lower code


def _expand_blocks(values: torch.Tensor, scale: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """values[i] * scale[i // blocksize] for i < n, in the dtype of the inputs (fp32)."""
    total = scale.numel() * blocksize
    if values.numel() > n:
        values = values[:n]
    if total != n:
        values = F.pad(values, (0, total - n))
    out = (values.view(-1, blocksize) * scale.unsqueeze(1)).view(-1)
    return out[:n] if total != n else out


@dataclass(eq=False, repr=False)
class NF4Weight:
    """A weight quantized to NF4 in bitsandbytes' layout. A plain object (not an nn.Module or Parameter).

    packed (ceil(n/2),) uint8 flat; absmax (n_blocks,) fp32, or uint8 codes when double-quantized, with
    nested_absmax (ceil(n_blocks/256),) fp32, nested_code (256,) fp32 and offset (float). shape/dtype: the
    original weight's.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None
    code: torch.Tensor = None  # type: ignore[assignment]  # filled with NF4_CODE on the packed device
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = NF4_CODE.to(self.packed.device)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device})"
        )

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block fp32 scales (n_blocks,), decoded through the double quantization when present."""
        if not self.double_quant:
            return self.absmax
        codes = torch.index_select(self.nested_code, 0, self.absmax.int())
        return _expand_blocks(codes, self.nested_absmax, self.nested_blocksize, codes.numel()) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight: NF4_CODE[q] * absmax in fp32, then cast to `dtype` (default: original dtype)."""
        byte = torch.arange(256, device=self.device)
        pair_lut = torch.stack([self.code[byte >> 4], self.code[byte & 15]], dim=1)  # byte -> (high, low)
        values = torch.index_select(pair_lut, 0, self.packed.int()).view(-1)  # faster than [] indexing
        out = _expand_blocks(values, self.absmax_fp32(), self.blocksize, self.numel)
        return out.view(self.shape).to(dtype or self.dtype)

    def row_alignment(self) -> int:
        """The smallest row step at which `rows()` can cut: whole blocks, and whole nested blocks when double
        quantized (r K must be a multiple of bs, times 256 with double quantization)."""
        cols, unit = self.shape[-1], self.blocksize * (self.nested_blocksize if self.double_quant else 1)
        return unit // math.gcd(unit, cols)

    def rows(self, r0: int, r1: int) -> NF4Weight:
        """Rows [r0, r1) of a 2-D weight as an NF4Weight viewing this one's storage (no copy). r0 must be a multiple
        of `row_alignment()`, and so must r1 unless it is the last row."""
        step, n_rows = self.row_alignment(), self.shape[0]
        if len(self.shape) != 2 or not 0 <= r0 < r1 <= n_rows or r0 % step or (r1 % step and r1 != n_rows):
            raise ValueError(f"rows [{r0}, {r1}) of a {tuple(self.shape)} NF4 weight: cuts must be multiples of {step}")
        cols, bs = self.shape[1], self.blocksize
        e0, e1 = r0 * cols, r1 * cols
        nested = None
        if self.double_quant:
            nb = self.nested_blocksize
            nested = self.nested_absmax[e0 // bs // nb : -(-(e1 // bs) // nb)]
        return NF4Weight(
            packed=self.packed[e0 // 2 : -(-e1 // 2)],
            absmax=self.absmax[e0 // bs : -(-e1 // bs)],
            shape=(r1 - r0, cols),
            dtype=self.dtype,
            blocksize=bs,
            nested_absmax=nested,
            nested_code=self.nested_code,
            offset=self.offset,
            code=self.code,
            nested_blocksize=self.nested_blocksize,
        )

    def to(self, device) -> NF4Weight:
        def move(t):
            return None if t is None else t.to(device)

        return NF4Weight(
            packed=move(self.packed),
            absmax=move(self.absmax),
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=self.offset,
            code=move(self.code),
            nested_blocksize=self.nested_blocksize,
        )

    def nbytes(self) -> int:
        """Bytes of this weight's own data: packed codes, block scales, nested scales and the fp32 offset.

        The NF4 table and the 8-bit dynamic map are shared constants and not counted.
        """
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.nested_absmax.numel() * self.nested_absmax.element_size() + 4
        return total

    def bits_per_param(self) -> float:
        return self.nbytes() * 8 / self.numel


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 1-D or 2-D fp32/bf16/fp16 tensor to NF4 exactly as bitsandbytes' reference path does."""
    check_blocksize(blocksize)
    if w.dtype not in DTYPES.values():
        raise TypeError(f"quantize_nf4 takes float32, bfloat16 or float16 tensors, got {w.dtype}")
    if w.dim() not in (1, 2) or w.numel() == 0:
        raise ValueError(f"quantize_nf4 takes a non-empty 1-D or 2-D tensor, got shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1).float()
    q, absmax = _blockwise_codes(flat, NF4_CODE.to(w.device), blocksize)
    if not bool(torch.isfinite(absmax).all()):
        raise ModelError(
            f"a weight of shape {tuple(w.shape)} contains NaN or inf values and cannot be quantized",
            "check the checkpoint (a diverged or corrupt save); load it with quant='none' to inspect it",
        )
    pairs = q.view(-1, 2).to(torch.uint8)
    packed = ((pairs[:, 0] << 4) | pairs[:, 1])[: (w.numel() + 1) // 2]
    weight = NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    return double_quantize(weight) if double_quant else weight


def double_quantize(weight: NF4Weight) -> NF4Weight:
    """The second stage on a weight with fp32 absmax: a new NF4Weight sharing `packed`, absmax as uint8 codes.

    offset = mean(absmax) over ALL blocks, so a caller that quantizes a tensor in chunks (blocks are independent)
    assembles the fp32 absmax first and calls this once.
    """
    if weight.double_quant:
        raise ValueError("this NF4Weight is already double-quantized")
    absmax = weight.absmax
    offset = absmax.mean()
    nested_code = DYNAMIC_MAP_SIGNED.to(absmax.device)
    codes, nested_absmax = _blockwise_codes(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return NF4Weight(
        packed=weight.packed,
        absmax=codes[: absmax.numel()].to(torch.uint8),
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=weight.blocksize,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=offset.item(),
        code=weight.code,
    )


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    return q.dequantize(dtype)

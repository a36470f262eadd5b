"""Block-wise 8-bit quantization with bitsandbytes' dynamic map: how lorafuse.training.optim8bit stores m and v.

A flat tensor is cut into blocks of `blocksize` elements; each block keeps its absmax (fp32) and one uint8 code per
element, the index of the map entry nearest to x / absmax. The layout, the map and the block size are explained in
lorafuse.training.optim8bit's docstring.
"""

from __future__ import annotations

import torch

BLOCKSIZE = 256


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256-entry dynamic quantization map, sorted ascending, fp32 (the values of bitsandbytes'
    `create_dynamic_map(signed)` with 7 exponent bits).

    Exponent e = 0..6 covers the decade [10^(e-6) * 0.1, 10^(e-6)]; inside it the fraction bits split
    [0.1, 1] linearly into 2^e (signed) or 2^(e+1) (unsigned) intervals and each code is an interval's
    midpoint. 0 and 1 are added explicitly, so zero is exact and the block maximum maps to 1.
    """
    values = [0.0, 1.0]
    for e in range(7):
        pieces = 2**e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1.0, pieces + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * (10.0 ** (e - 6))
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE):
    """x (n,) float -> (q uint8 (n,), absmax fp32 (ceil(n/blocksize),)): nearest code to x / absmax."""
    x = x.reshape(-1).float()
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0: dividing by a tiny value keeps x/absmax = 0 -> the exact 0 code.
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    boundaries = (code[1:] + code[:-1]) / 2  # midpoints between neighbouring codes: nearest-code search
    q = torch.bucketize(scaled, boundaries).to(torch.uint8)
    return q.view(-1)[:n], absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE
) -> torch.Tensor:
    """(q uint8 (n,), absmax (blocks,)) -> fp32 (n,) = code[q] * absmax of the element's block."""
    n = q.numel()
    values = torch.nn.functional.pad(code[q.long()], (0, (-n) % blocksize)).view(-1, blocksize)
    return (values * absmax[:, None]).view(-1)[:n]

"""Projections that share their input (q, k, v) as ONE base GEMM: the grouped LoRA linear.

Math, for projections i = 1..G of one input x (M, K), each a LoRA linear of lora_linear.py
(W_i (N_i, K) dense or NF4, A_i (r_i, K), B_i (N_i, r_i), scaling s_i, dropout p_i with its own seed, bias b_i):
    S_i = drop_i(x) A_i^T                              (M, r_i), as lora_linear.lora_down (same mask)
    Y   = x [W_1; ...; W_G]^T + [b_1 | ... | b_G]      (M, sum N_i): ONE GEMM over the group's weights,
                                                       NF4 dequantized into the row slices of one buffer
    Y[:, slice_i] += s_i S_i B_i^T                     each projection's LoRA term in its column slice
    y_i = Y[:, slice_i]                                column-slice views of Y (no copy), strides (sum N, 1)
Backward (dY_i (M, N_i)): dS_i, dB_i, dA_i, db_i per projection exactly as lora_linear.py, and
    dx = sum_i dY_i W_i + sum_i drop_i'(dS_i A_i)
    the group dequantized into the buffer once (each weight once, as in the forward), then G GEMMs over its
    row slices accumulating into one dx (K-slices of dx = [dY_1 | ... | dY_G] W): no per-projection (M, K)
    dx for autograd to sum (two (M, K) adds, ~25 us at 2048 x 4096 bf16). LORAFUSE_GROUP_DX_CAT=1 runs
    instead one GEMM over a concatenated dY: one long-K GEMM (likely nearer the MLP's rate than three
    2048 x 4096 x 4096 ones) for an (M, sum N) copy (~25 us and a 50 MB transient at 2048 x 12288 bf16);
    off until a benchmark shows it wins on the card (dense bases always take the K-slices: no copy of W).

Why: on an H200 (Llama-2-7B, M = 2048 tokens, bf16) a 2048 x 4096 x 4096 GEMM ran at ~570 TFLOP/s (121 us)
while the MLP's 2048 x 11008 x 4096 reached ~725; one 2048 x 12288 x 4096 GEMM for q|k|v should take
~290 us instead of 3 x 121 us, in the forward and again in the checkpoint recompute.
Measured (H200, 7B QLoRA 4 x 512 with CUDA graphs, NOTES.md session 4): no gain. The base GEMMs took 241 ms
over two profiled steps, against 236 ms with three single projections on another machine; the grouped forward
GEMM costs what the three did. The A/B in one call (H200, commit fcc5f93, runs 20261128T174450 / T174531):
0.1619 s with the group, 0.1616 s without, 5.014 / 5.004 GiB. So it is OFF by default (three single
projections: the simpler path, 10 MB less); LORAFUSE_QKV_GROUP=1 turns it on (e.g. for a card where the
4096-wide GEMMs run further below the wide ones).

Dense bases are not copied into a buffer: a copy of 3 x 4096 x 4096 bf16 weights moves ~200 MB (~50 us),
most of the ~73 us a single GEMM would save, and adds 100 MB; they run one GEMM per projection into the
column slices of Y (the group still saves the output and dx allocations and autograd's sum of G dx).

Memory: the NF4 group is dequantized into lora_linear.dequant_buffer, the one buffer the single-projection
path uses, which grows from the largest single weight to max(largest weight, largest group): Llama-2-7B
3 x 4096 x 4096 = 50.3M elements vs the MLP's 11008 x 4096 = 45.1M, +10 MB in bf16; for GQA models k and v
are narrower (Llama-3-8B: 6144 x 4096 = 25.2M < 14336 x 4096), no growth. Saved for backward: x and the G
(M, r_i) S tensors, as G single calls save; never a dequantized weight, a mask or an (M, N) temporary.
The outputs are views of Y, so Y lives while any of them does: RoPE writes new q and k (autograd forbids
in-place writes to a custom Function's view outputs, and rope.py takes its out-of-place branch for views),
and SDPA saves v, which keeps Y's q|k columns too. Under gradient checkpointing that is a per-layer
transient; without it, M x (N_q + N_k) more per layer stays saved (32 MB at 2048 tokens for Llama-2-7B).

Falls back to one lora_linear per projection (same seeds, same masks, same numbers) off the Triton path,
for a trainable base, for bases of different kinds (NF4 and dense) or where `dispatch` picks the in-tile
Triton GEMM for this M. No host sync, no value-dependent shape: CUDA-graph and checkpoint-recompute safe.
Dtype policy: lora_linear.py's (compute dtype x.dtype, fp32 accumulation, fp32 LoRA masters).
"""

from __future__ import annotations

import os

import torch

from . import _runtime, fp8
from .lora_linear import (
    Operands,
    add_lora_input_grad,
    bias_grad,
    dequant_buffer,
    dispatch,
    fp8_input,
    lora_down,
    lora_grad_a,
    lora_grad_s_b,
    lora_linear,
    with_seed,
)
from .nf4_dequant import nf4_dequantize
from .reference import LoRAWeights

GROUP_DX_CAT = os.environ.get("LORAFUSE_GROUP_DX_CAT", "0") == "1"
# LORAFUSE_QKV_GROUP=1 runs q, k and v as one group; off by default since the H200 A/B measured no gain (module
# docstring, "Measured"); same results either way.
GROUP = os.environ.get("LORAFUSE_QKV_GROUP", "0") == "1"


def _slices(opss: list[Operands]) -> list[slice]:
    out, start = [], 0
    for o in opss:
        out.append(slice(start, start + o.lw.out_features))
        start += o.lw.out_features
    return out


def group_weight(opss: list[Operands]) -> torch.Tensor:
    """[W_1; ...; W_G] (sum N_i, K) for NF4 bases, each dequantized into its row slice of the shared buffer
    (valid until the next dequantize on this device and dtype)."""
    w0, dtype = opss[0].lw.weight, opss[0].dtype
    n, k = sum(o.lw.out_features for o in opss), int(w0.shape[1])
    buf = dequant_buffer(w0.packed.device, dtype, n * k)[: n * k].view(n, k)
    for o, rows in zip(opss, _slices(opss)):
        nf4_dequantize(o.lw.weight, dtype, out=buf[rows])
    return buf


def _group_bias(opss: list[Operands], device) -> torch.Tensor | None:
    if all(o.bias is None for o in opss):
        return None
    return torch.cat(
        [o.bias if o.bias is not None else torch.zeros(o.lw.out_features, dtype=o.dtype, device=device) for o in opss]
    )


def group_forward(x: torch.Tensor, opss: list[Operands]):
    """(Y (M, sum N_i), [S_i]) for x (M, K) contiguous in the compute dtype."""
    slices = _slices(opss)
    ss = [lora_down(x, o) for o in opss]
    y = torch.empty(x.shape[0], slices[-1].stop, dtype=x.dtype, device=x.device)
    if opss[0].lw.is_nf4:
        gemms = [(y, group_weight(opss), _group_bias(opss, x.device))]
    else:
        gemms = ((y[:, cols], o.dense(), o.bias) for o, cols in zip(opss, slices))
    for out, w, bias in gemms:
        if bias is not None:
            torch.addmm(bias, x, w.t(), out=out)
        else:
            torch.mm(x, w.t(), out=out)
    for o, s, cols in zip(opss, ss, slices):
        if s is not None:
            y[:, cols].addmm_(s, o.b_scaled.t())
    return y, ss


def group_input_grad(dys: list[torch.Tensor], dss: list, opss: list[Operands]) -> torch.Tensor:
    """dx = sum_i dY_i W_i + drop_i'(dS_i A_i), the base weights dequantized once for the group."""
    m, k = dys[0].shape[0], opss[0].lw.weight.shape[1]
    dx = torch.empty(m, k, dtype=dys[0].dtype, device=dys[0].device)
    if opss[0].lw.is_nf4:
        w = group_weight(opss)
        gemms = (
            [(torch.cat(dys, dim=1), w)] if GROUP_DX_CAT else [(dy, w[rows]) for dy, rows in zip(dys, _slices(opss))]
        )
    else:
        gemms = ((dy, o.dense()) for dy, o in zip(dys, opss))  # lazily: one cast weight alive at a time
    for i, (dy, w_i) in enumerate(gemms):
        if i:
            dx.addmm_(dy, w_i)
        else:
            torch.mm(dy, w_i, out=dx)
    for ds, o in zip(dss, opss):
        add_lora_input_grad(dx, ds, o)
    return dx


class LoRAGroupFunction(torch.autograd.Function):
    """(y_1, ..., y_G) = column slices of x [W_1; ...; W_G]^T + b + [s_i S_i B_i^T]_i on 2-D x; saves x, the S_i.

    Inputs: x, then (lora_A, lora_B, bias) per projection, then the specs. Backward derivation: y_i depends
    on x only through x W_i^T and S_i, so each projection's dA_i, dB_i, db_i is lora_linear's rule on
    (x, S_i, dY_i), and dL/dx sums the G input gradients: sum_i dY_i W_i + drop_i'(dL/dS_i A_i).
    """

    @staticmethod
    @_runtime.autocast_off
    def forward(ctx, x, *args):
        specs = args[-1]
        opss = [Operands(lw, x.dtype) for lw in specs]
        y, ss = group_forward(x, opss)
        ctx.specs = specs
        ctx.save_for_backward(x, *ss, *(t for o in opss for t in o.casts()))
        return tuple(y[:, cols] for cols in _slices(opss))

    @staticmethod
    @_runtime.autocast_off
    def backward(ctx, *dys):
        x, *rest = ctx.saved_tensors
        n = len(ctx.specs)
        ss, casts = rest[:n], rest[n:]
        opss = [Operands(lw, x.dtype, casts[2 * i : 2 * i + 2]) for i, lw in enumerate(ctx.specs)]
        dys = [dy.contiguous() for dy in dys]
        grads, dss = [], []
        for dy, s, o in zip(dys, ss, opss):
            ds, d_b = lora_grad_s_b(dy, s, o)
            dss.append(ds)
            grads += [lora_grad_a(ds, x, o), d_b, bias_grad(dy, o)]
        dx = group_input_grad(dys, dss, opss) if ctx.needs_input_grad[0] else None
        return (dx, *grads, None)


def groupable(x: torch.Tensor, specs: tuple[LoRAWeights, ...]) -> bool:
    """True when `specs` (on input x) run as one group; else each runs lora_linear (same results)."""
    if not GROUP or len(specs) < 2 or not _runtime.use_triton(x) or fp8.ENABLED:  # FP8: single projections
        return False
    if any(isinstance(lw.weight, torch.Tensor) and lw.weight.requires_grad for lw in specs):
        return False
    if len({lw.is_nf4 for lw in specs}) > 1:
        return False
    return dispatch(x.numel() // x.shape[-1], specs[0].is_nf4) == "cublas"


def lora_linear_group(x: torch.Tensor, specs) -> tuple[torch.Tensor, ...]:
    """(y_i (..., N_i) = lora_linear(x, specs[i]) for each i), as views of one (..., sum N_i) tensor when grouped.

    Seeds are drawn in order, as G lora_linear calls would draw them, so dropout masks are identical.
    """
    specs = tuple(with_seed(lw) for lw in specs)
    if not groupable(x, specs):
        xq = fp8_input(x.reshape(-1, x.shape[-1]), specs[0]) if _runtime.use_triton(x) else None  # once for all
        return tuple(lora_linear(x, lw, xq) for lw in specs)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    tensors = [t for lw in specs for t in (lw.lora_A, lw.lora_B, lw.bias)]
    ys = LoRAGroupFunction.apply(x2, *tensors, specs)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

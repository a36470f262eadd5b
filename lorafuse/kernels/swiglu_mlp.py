"""The Llama MLP with LoRA on gate, up and down as one autograd Function that recomputes SwiGLU.

Math (x (M, D) tokens, F the intermediate size; each projection a LoRA linear of lora_linear.py):
    e = gate(x) (M, F),  g = up(x) (M, F),  h = silu(e) * g,  y = down(h) (M, D)
    silu(e) = e * sigmoid(e);  d silu / de = sigmoid(e) * (1 + e * (1 - sigmoid(e)))
Backward (dY (M, D)):
    dh = down's input gradient of dY                       (dY W_d + drop'(dS_d A_d))
    h, de, dg from one elementwise kernel that recomputes sigmoid(e), silu(e) and h, writing
       h over dh, de = dh * g * silu'(e) over e, dg = dh * silu(e) over g   (no new (M, F) tensor)
    down's dA uses the recomputed h; dx = gate's input gradient of de + up's of dg, accumulated in one
    buffer; LoRA dA/dB of each projection as in lora_linear.py.
Saved for backward: x, e, g (in the compute dtype), the three (M, r) S tensors and the projections' casts of
A and s B (lora_linear.Operands.casts). Not saved: h,
silu(e), any dequantized weight, any dropout mask. Peft + autograd keeps about four (M, F) tensors
(silu input and output, up output, product) plus per-projection dropout copies and (M, r) LoRA
intermediates; this keeps two.

In a gradient checkpoint's recompute (`_runtime.in_recompute()`: lorafuse's checkpoint function and activation
offload set it) the down projection's base GEMM and its NF4 dequantization are skipped: the backward needs
S_d = drop(h) A_d^T but not y, whose only reader is the decoder layer's residual sum, and that sum saves nothing
for its backward. The recompute returns an uninitialized y of the right shape. This removes one of the three
passes over the largest weight: 2 M F D FLOPs per checkpointed layer (at Llama-2-7B, 4 x 512 tokens, 7% of
the step's base-GEMM FLOPs). It relies on the layer structure the fast path accepts (Llama-family: the MLP's
output goes only into `residual + mlp(x)`).

When nothing will read the saved set (no autograd graph: evaluation, generation, activation offload's forward;
or a checkpointed layer's forward, whose saved tensors the checkpoint drops), the forward writes h over e: one
(M, F) tensor less at the forward's peak (the peak of the lean settings, with the output head staged).

Because backward overwrites its saved e and g, it runs once: a second backward through the same graph
(retain_graph=True) raises instead of returning wrong numbers. Gradient checkpointing is fine: its
recompute builds a fresh graph.

Dtype: the compute dtype is x.dtype; SwiGLU math is fp32 with one rounding per output (HF rounds
silu(e) and the product separately). LoRA masters are cast per call (see lora_linear.py).
"""

from __future__ import annotations

import torch

from . import _runtime
from .lora_linear import (
    Operands,
    bias_grad,
    fp8_input,
    lora_down,
    lora_forward,
    lora_grad_a,
    lora_grad_s_b,
    lora_input_grad,
    with_seed,
)
from .reference import LoRAWeights, swiglu_mlp_reference, swiglu_reference

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = e * tl.sigmoid(e) * g
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        dh_ptr, e_ptr, g_ptr, h_out_ptr, de_out_ptr, dg_out_ptr, n, WANT_H: tl.constexpr, BLOCK: tl.constexpr
    ):
        # outputs may alias the inputs: every element is read before the same thread writes it
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(e)
        silu = e * sig
        if WANT_H:
            tl.store(h_out_ptr + offs, (silu * g).to(h_out_ptr.dtype.element_ty), mask=mask)
        tl.store(de_out_ptr + offs, (dh * g * sig * (1.0 + e * (1.0 - sig))).to(de_out_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_out_ptr + offs, (dh * silu).to(dg_out_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def swiglu_forward(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(e) * g into `out` (may be e itself: each element is read before it is written) or a new tensor."""
    h = torch.empty_like(e) if out is None else out
    _swiglu_fwd_kernel[_grid(e.numel())](e, g, h, e.numel(), BLOCK=_BLOCK, num_warps=4)
    return h


def swiglu_backward_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> None:
    """In place: dh <- h, e <- de, g <- dg (all contiguous, one shape)."""
    _swiglu_bwd_kernel[_grid(e.numel())](dh, e, g, dh, e, g, e.numel(), WANT_H=True, BLOCK=_BLOCK, num_warps=4)


class SwiGLUFunction(torch.autograd.Function):
    """h = silu(e) * g elementwise; saves e and g; backward writes new de, dg (no aliasing).

    Backward derivation: dh/dg = silu(e); dh/de = g * sigmoid(e) * (1 + e * (1 - sigmoid(e))).
    """

    @staticmethod
    def forward(ctx, e, g):
        ctx.save_for_backward(e, g)
        return swiglu_forward(e, g)

    @staticmethod
    def backward(ctx, dh):
        e, g = ctx.saved_tensors
        de, dg = torch.empty_like(e), torch.empty_like(g)
        _swiglu_bwd_kernel[_grid(e.numel())](
            dh.contiguous(), e, g, dh, de, dg, e.numel(), WANT_H=False, BLOCK=_BLOCK, num_warps=4
        )
        return de, dg


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u; the reference on CPU tensors."""
    if not _runtime.use_triton(g):
        return swiglu_reference(g, u)
    return SwiGLUFunction.apply(g.contiguous(), u.contiguous())


class SwiGLUMLPFunction(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)) on 2-D x; saves x, e, g and the three (M, r) LoRA S tensors.

    Backward derivation: chain rule through y = down(h), h = silu(e) * g, e = gate(x), g = up(x):
    dh = dL/dh from down (lora_linear's dx rule), de = dh * g * silu'(e), dg = dh * silu(e),
    dx = gate's dx rule applied to de + up's applied to dg; each projection's dA, dB from its own
    (input, S, output-gradient) triple: (x, S_g, de), (x, S_u, dg), (h, S_d, dY).
    """

    @staticmethod
    @_runtime.autocast_off
    def forward(ctx, x, ga, gb, gbias, ua, ub, ubias, da, db, dbias, specs, disposable):
        gate, up, down = (Operands(lw, x.dtype) for lw in specs)
        xq = fp8_input(x, gate.lw)  # the FP8 forward's codes of x, shared by gate and up (fp8.py; None: bf16)
        e, s_g = lora_forward(x, gate, xq)
        g, s_u = lora_forward(x, up, xq)
        h = swiglu_forward(e, g, out=e if disposable else None)  # disposable: e is never read again (docstring)
        if _runtime.in_recompute():  # the backward reads S_d, never y: no down GEMM, no dequantize (docstring)
            y, s_d = x.new_empty(x.shape[0], down.lw.out_features), lora_down(h, down)
        else:
            y, s_d = lora_forward(h, down)
        ctx.specs, ctx.consumed = specs, False
        ctx.save_for_backward(x, e, g, s_g, s_u, s_d, *gate.casts(), *up.casts(), *down.casts())
        return y

    @staticmethod
    @_runtime.autocast_off
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError(
                "the fused LoRA MLP reuses its saved activations in backward and cannot run "
                "backward twice; do not pass retain_graph=True through it (or turn the fast path off)"
            )
        ctx.consumed = True
        x, e, g, s_g, s_u, s_d, *casts = ctx.saved_tensors
        gate, up, down = (Operands(lw, x.dtype, casts[2 * i : 2 * i + 2]) for i, lw in enumerate(ctx.specs))
        dy = dy.contiguous()
        ds_d, db_d = lora_grad_s_b(dy, s_d, down)
        dh = lora_input_grad(dy, ds_d, down)
        swiglu_backward_(dh, e, g)
        h, de, dg = dh, e, g
        da_d = lora_grad_a(ds_d, h, down)
        ds_g, db_g = lora_grad_s_b(de, s_g, gate)
        ds_u, db_u = lora_grad_s_b(dg, s_u, up)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = lora_input_grad(de, ds_g, gate)
            lora_input_grad(dg, ds_u, up, dx, accumulate=True)
        return (
            dx,
            lora_grad_a(ds_g, x, gate),
            db_g,
            bias_grad(de, gate),
            lora_grad_a(ds_u, x, up),
            db_u,
            bias_grad(dg, up),
            da_d,
            db_d,
            bias_grad(dy, down),
            None,
            None,
        )


def swiglu_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x (..., D); the reference on CPU or with a trainable base weight."""
    specs = tuple(with_seed(lw) for lw in (gate, up, down))
    trainable = any(isinstance(lw.weight, torch.Tensor) and lw.weight.requires_grad for lw in specs)
    if not _runtime.use_triton(x) or trainable:
        return swiglu_mlp_reference(x, *specs)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    tensors = [t for lw in specs for t in (lw.lora_A, lw.lora_B, lw.bias)]
    disposable = not torch.is_grad_enabled() or _runtime.in_checkpointed_forward()
    y = SwiGLUMLPFunction.apply(x2, *tensors, specs, disposable)
    return y.view(*x.shape[:-1], y.shape[-1])

"""Cross-entropy against an output head that arrives in vocabulary chunks: one pass over the head, and neither the
whole head nor a whole row of logits is ever on the device at once.

Used for a head kept in pinned host memory (`train.head_on_host`, model/host_embedding.py): the chunks stream in
over PCIe while earlier ones are consumed, so the head's device footprint is the few chunks in flight, not the
table (0.24 GiB for Llama-2-7B, 0.98 GiB for Llama-3-8B).

Math, for rows t (hidden h_t, label y_t, weight w_t = 1 for a kept row, 0 for an ignored one) and vocabulary
chunks c (rows W_c of the head), the online softmax of flash attention with the head as both keys and values:
    z_c  = h W_c^T                                   fp32 accumulator of the GEMM
    m'   = max(m, max_j z_c[:, j]);  a = exp(m - m')                 (m = -inf before the first chunk)
    l    <- a l + sum_j exp(z_c - m')
    o    <- a o + exp(z_c - m') W_c                  the softmax-weighted sum of head rows, unnormalised, fp32
    z_y  <- z_c[t, y_t - v0] when y_t falls in the chunk
After the last chunk: lse = m + log l, loss = sum_t w_t (lse_t - z_y,t), and since d lse/dz = softmax(z),
    dL/dh_t = w_t (softmax(z_t) W - W[y_t]) = w_t (o_t / l_t - W[y_t]).
The gradient is formed in the forward, as in kernels/cross_entropy.py; backward scales it by the incoming scalar.

Cost against the staged head (kernels/cross_entropy.py): the same two GEMMs per logit (z, then the softmax times
W), plus a few passes over each (T, chunk) block in fp32 and the rescale of o; state (T, H) fp32 for o and (T,)
for m, l, z_y. Every row is computed (ignored ones weigh 0): no data-dependent shape, so a CUDA graph records it.
Precision: the softmax weights enter the GEMM in the compute dtype (as the staged loss's dz does), all else fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from . import _runtime

LOGITS_BLOCK_BYTES = 64 << 20  # one fp32 (rows, chunk) logits block at most; longer batches go in row blocks


def _logits_fp32(h: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
    """h W_c^T as fp32: the GEMM's accumulator written out directly where cuBLAS can, else cast."""
    if h.is_cuda and h.dtype == torch.bfloat16 and _runtime.gemm_fp32_out(h.device):
        return torch.mm(h, wc.t(), out_dtype=torch.float32)
    return torch.mm(h, wc.t()).float()


def streamed_pass(hidden: torch.Tensor, labels: torch.Tensor, chunks: Iterable[tuple[int, torch.Tensor]],
                  target_rows: Callable[[torch.Tensor], torch.Tensor], ignore_index: int = -100,
                  want_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over kept rows of CE(h W^T, y) as an fp32 scalar, dL/dh in hidden's dtype or None).

    hidden (T, H); labels (T,); chunks yields (first vocabulary row, W_c (rows, H) in hidden's dtype) covering the
    vocabulary in order; target_rows(y) returns W[y] (T, H) for in-range labels (the head's rows, read in place).
    """
    rows, dtype = hidden.shape[0], hidden.dtype
    keep = labels != ignore_index
    label = torch.where(keep, labels, 0)
    m = torch.full((rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
    s = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    z_y = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    o = torch.zeros(rows, hidden.shape[1], dtype=torch.float32, device=hidden.device) if want_grad else None
    for v0, wc in chunks:
        n = wc.shape[0]
        step = max(1, LOGITS_BLOCK_BYTES // (4 * n))  # rows per (rows, n) fp32 logits block
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            z = _logits_fp32(hidden[r], wc)
            lab = label[r]
            inside = (lab >= v0) & (lab < v0 + n)
            z_y[r] += torch.where(inside, z.gather(1, (lab - v0).clamp_(0, n - 1)[:, None]).squeeze(1), 0.0)
            m_new = torch.maximum(m[r], z.amax(dim=1))
            a = torch.exp(m[r] - m_new)
            p = z.sub_(m_new[:, None]).exp_()  # in place over z: exp(z - m')
            s[r] = s[r] * a + p.sum(dim=1)
            if want_grad:
                o[r].mul_(a[:, None]).add_(torch.mm(p.to(dtype), wc))
            m[r] = m_new
            del z, p
        del wc  # the chunk's buffer goes back to the stream's pool before the next one is asked for
    lse = m + torch.log(s)
    weight = keep.to(torch.float32)
    total = ((lse - z_y) * weight).sum()
    if not want_grad:
        return total, None
    o.div_(s[:, None]).sub_(target_rows(label)).mul_(weight[:, None])  # mixed-dtype sub: W[y] read, not upcast
    return total, o.to(dtype)


class StreamedHeadCrossEntropy(torch.autograd.Function):
    """loss = sum over kept rows of CE(h W^T, y) with W streamed in chunks (`streamed_pass`); the head is frozen.

    Backward derivation: in the module docstring. Saved for backward: dL/dh (T, H) in hidden's dtype."""

    @staticmethod
    @_runtime.autocast_off
    def forward(ctx, hidden, labels, chunks, target_rows, ignore_index):
        total, dh = streamed_pass(hidden, labels, chunks, target_rows, ignore_index, ctx.needs_input_grad[0])
        ctx.save_for_backward(dh)
        return total

    @staticmethod
    @_runtime.autocast_off
    def backward(ctx, grad_loss):
        (dh,) = ctx.saved_tensors
        return (None if dh is None else dh * grad_loss.to(dh.dtype)), None, None, None, None


def streamed_head_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor,
                                chunks: Iterable[tuple[int, torch.Tensor]],
                                target_rows: Callable[[torch.Tensor], torch.Tensor],
                                ignore_index: int = -100) -> torch.Tensor:
    """Summed CE(hidden W^T, labels) over labels != ignore_index for hidden (..., H), labels (...), with the
    frozen head W given as vocabulary chunks (`streamed_pass`). Differentiable with respect to hidden."""
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels2 = labels.reshape(-1)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return StreamedHeadCrossEntropy.apply(hidden2, labels2, chunks, target_rows, ignore_index)
    return streamed_pass(hidden2, labels2, chunks, target_rows, ignore_index, want_grad=False)[0]

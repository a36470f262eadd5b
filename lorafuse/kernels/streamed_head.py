"""Cross-entropy against an output head that arrives in vocabulary chunks: one pass over the head, and neither the
whole head nor a whole row of logits is ever on the device at once.

Used for a head kept in pinned host memory (`train.head_on_host`, model/host_embedding.py): the chunks stream in
over PCIe while earlier ones are consumed, so the head's device footprint is the few chunks in flight, not the
table (0.24 GiB for Llama-2-7B, 0.98 GiB for Llama-3-8B).

Math, for rows t (hidden h_t, label y_t, weight w_t = 1 for a kept row, 0 for an ignored one) and vocabulary
chunks c (rows W_c of the head), the online softmax of flash attention with the head as both keys and values:
    z_c  = h W_c^T                                   fp32 accumulator of the GEMM
    m'   = max(m, max_j z_c[:, j]);  a = exp(m - m')                 (m = -inf before the first chunk)
    p    = exp(z_c - m'), its label entry moved out:  p_y = p[t, y_t - v0] (0 when y_t is not in the chunk)
    r    <- a r + sum_{j != y} p_j;   q <- a q + p_y
    o    <- a o + p W_c                              (label column zeroed: sum_{j != y} e^{z_j - m} W_j, fp32)
    z_y  <- z_c[t, y_t - v0] when y_t falls in the chunk
After the last chunk, with l = r + q the softmax denominator: lse = m + log l, loss = sum_t w_t (lse_t - z_y,t),
and since d lse/dz = softmax(z),
    dL/dh_t = w_t (softmax(z_t) W - W[y_t]) = w_t ((o + q W[y]) / l - W[y]) = w_t (o_t - r_t W[y_t]) / l_t.
The label's own weight never enters a 16-bit GEMM: for a confident row (p_y near 1) the gradient is small, and
forming it as o / l - W[y] would leave it the difference of two large rounded terms.
The gradient is formed in the forward, as in kernels/cross_entropy.py; backward scales it by the incoming scalar.

Cost against the staged head (kernels/cross_entropy.py): the same two GEMMs per logit (z, then the softmax times
W), plus a few passes over each (T, chunk) block in fp32 and the rescale of o; state (T, H) fp32 for o and (T,)
for m, r, q, z_y. Every row is computed (ignored ones weigh 0): no data-dependent shape, so a CUDA graph records it.
Precision: the softmax weights enter the GEMM in the compute dtype (as the staged loss's dz does), all else fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from . import _runtime

LOGITS_BLOCK_BYTES = 64 << 20  # one fp32 (rows, chunk) logits block at most; longer batches go in row blocks


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b as fp32 for 16-bit a, b: the GEMM's accumulator written out directly where cuBLAS can, else cast."""
    if a.is_cuda and a.dtype == torch.bfloat16 and _runtime.gemm_fp32_out(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def streamed_pass(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunks: Iterable[tuple[int, torch.Tensor]],
    target_rows: Callable[[torch.Tensor], torch.Tensor],
    ignore_index: int = -100,
    want_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over kept rows of CE(h W^T, y) as an fp32 scalar, dL/dh in hidden's dtype or None).

    hidden (T, H); labels (T,); chunks yields (first vocabulary row, W_c (rows, H) in hidden's dtype) covering the
    vocabulary in order; target_rows(y) returns W[y] (T, H) for in-range labels (the head's rows, read in place).
    """
    rows, dtype = hidden.shape[0], hidden.dtype
    keep = labels != ignore_index
    label = torch.where(keep, labels, 0)
    m = torch.full((rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
    s_rest = torch.zeros(rows, dtype=torch.float32, device=hidden.device)  # r: sum of exp(z - m) over j != y
    s_y = torch.zeros(rows, dtype=torch.float32, device=hidden.device)  # q: exp(z_y - m)
    z_y = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    o = torch.zeros(rows, hidden.shape[1], dtype=torch.float32, device=hidden.device) if want_grad else None
    for v0, wc in chunks:
        n = wc.shape[0]
        step = max(1, LOGITS_BLOCK_BYTES // (4 * n))  # rows per (rows, n) fp32 logits block
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            z = _mm_fp32(hidden[r], wc.t())
            lab = label[r]
            inside = (lab >= v0) & (lab < v0 + n)
            at = (lab - v0).clamp_(0, n - 1)[:, None]
            z_y[r] += torch.where(inside, z.gather(1, at).squeeze(1), 0.0)
            m_new = torch.maximum(m[r], z.amax(dim=1))
            a = torch.exp(m[r] - m_new)
            p = z.sub_(m_new[:, None]).exp_()  # in place over z: exp(z - m')
            g = p.gather(1, at).squeeze(1)
            p_y = torch.where(inside, g, 0.0)
            p.scatter_(1, at, torch.where(inside, 0.0, g)[:, None])  # the label's own term out of p
            s_rest[r] = s_rest[r] * a + p.sum(dim=1)
            s_y[r] = s_y[r] * a + p_y
            if want_grad:
                o[r].mul_(a[:, None]).add_(_mm_fp32(p.to(dtype), wc))
            m[r] = m_new
            del z, p
        del wc  # the chunk's buffer goes back to the stream's pool before the next one is asked for
    s = s_rest + s_y
    lse = m + torch.log(s)
    weight = keep.to(torch.float32)
    total = ((lse - z_y) * weight).sum()
    if not want_grad:
        return total, None
    # softmax W - W[y] = (o + s_y W[y]) / s - W[y] = (o - s_rest W[y]) / s: the label's own weight never enters
    # a 16-bit GEMM, so a confident row's small gradient is not the difference of two large rounded terms
    o.addcmul_(target_rows(label), s_rest[:, None], value=-1.0).mul_((weight / s)[:, None])
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


def streamed_head_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunks: Iterable[tuple[int, torch.Tensor]],
    target_rows: Callable[[torch.Tensor], torch.Tensor],
    ignore_index: int = -100,
) -> torch.Tensor:
    """Summed CE(hidden W^T, labels) over labels != ignore_index for hidden (..., H), labels (...), with the
    frozen head W given as vocabulary chunks (`streamed_pass`). Differentiable with respect to hidden."""
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels2 = labels.reshape(-1)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return StreamedHeadCrossEntropy.apply(hidden2, labels2, chunks, target_rows, ignore_index)
    return streamed_pass(hidden2, labels2, chunks, target_rows, ignore_index, want_grad=False)[0]

"""Cross-entropy fused with the LM head, chunked over tokens: (T, V) logits never exist at once.

Math (hidden h (T, H), head W (V, H), optional bias b (V,), labels y (T,), rows with y = ignore_index
skipped; n = number of kept rows; scale = 1/n for reduction "mean", 1 for "sum"):
    z_t   = h_t W^T + b                                   logits, one chunk of rows at a time
    loss  = scale * sum_t (logsumexp(z_t) - z_t[y_t])
    dz_t  = scale * (softmax(z_t) - onehot(y_t))          written over z_t, in place
    dh_t  = dz_t W;   dW = sum_t dz_t^T h_t;   db = sum_t dz_t
Only kept rows reach the head (completion-only data skips its prompt rows entirely), `chunk_size`
rows at a time: the head GEMM (cuBLAS, compute dtype), then one Triton program per row computes the
row's logsumexp online in fp32 and overwrites the logits with dz (second pass over the row), then
dh (and dW, db when the head is trainable) take two more GEMMs. The gradients are formed in forward
(like Liger's and Unsloth's fused losses); backward only scales them by the incoming gradient.

Shapes / dtypes: logits and dz are in the compute dtype (hidden's), the logsumexp and the loss in
fp32 (HF's loss also upcasts bf16 logits). dW accumulates in the head's dtype through addmm (fp32
accumulation inside each GEMM; a trainable head is rare in LoRA). Saved for backward: dh (T, H) and
dW/db when wanted - never anything vocabulary-sized. Peak extra memory: one (chunk, V) logits block
(default chunk: 256 MiB of logits, e.g. 1046 rows at V = 128256 in bf16).
"""

from __future__ import annotations

import contextlib

import torch

from . import _runtime
from .reference import fused_linear_cross_entropy_reference

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_rows_kernel(
        logits_ptr,
        labels_ptr,
        loss_ptr,
        V,
        stride_row,
        scale,
        ignore_index,
        WANT_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        raw = tl.load(labels_ptr + row)
        keep = raw != ignore_index  # ignored rows (only in the fixed-shape pass): loss 0, gradient 0
        label = tl.where(keep, raw, 0)
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):  # pass 1: online logsumexp
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(base + label).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(keep, lse - target, 0.0))
        if WANT_GRAD:
            for v0 in range(0, V, BLOCK_V):  # pass 2: dz = scale * (softmax - onehot), over the logits
                cols = v0 + tl.arange(0, BLOCK_V)
                z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
                p = tl.exp(z - lse)
                dz = tl.where(keep, tl.where(cols == label, p - 1.0, p) * scale, 0.0)
                tl.store(base + cols, dz.to(logits_ptr.dtype.element_ty), mask=cols < V)


LOGITS_BUDGET_BYTES = 256 << 20
# The fixed-shape pass (the one CUDA-graph capture needs) outside capture too: training/graphs.py turns it on for
# the eager warm-up steps before a capture, so they run (and autotune, and compile) exactly what gets recorded.
FIXED_SHAPE = False


@contextlib.contextmanager
def fixed_shape(on: bool = True):
    """Within the block, reduction="sum" takes the fixed-shape pass (every row, ignored rows weighted 0)."""
    global FIXED_SHAPE
    old, FIXED_SHAPE = FIXED_SHAPE, on
    try:
        yield
    finally:
        FIXED_SHAPE = old


def fixed_shape_wanted(t: torch.Tensor) -> bool:
    """Whether a pass over `t` must keep fixed shapes (no host synchronisation, no data-dependent size): inside
    `fixed_shape`, or while a CUDA graph captures on the current stream."""
    return FIXED_SHAPE or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def default_chunk(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so one (chunk, V) logits block stays within LOGITS_BUDGET_BYTES."""
    return max(16, LOGITS_BUDGET_BYTES // (vocab * torch.finfo(dtype).bits // 8))


def _ce_rows(
    logits: torch.Tensor, labels: torch.Tensor, scale: float, want_grad: bool, ignore_index: int = -100
) -> torch.Tensor:
    """Per-row loss (fp32); with want_grad, logits are overwritten by scale * (softmax - onehot).
    Rows labelled ignore_index get loss 0 and gradient 0."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block_v = min(triton.next_power_of_2(vocab), 128 if _runtime.INTERPRET else 4096)
    _ce_rows_kernel[(rows,)](
        logits,
        labels,
        loss,
        vocab,
        logits.stride(0),
        scale,
        ignore_index,
        WANT_GRAD=want_grad,
        BLOCK_V=block_v,
        num_warps=8,
    )
    return loss


def _chunk(h, w, b, y, scale, want_grad, ignore_index, rows, grads, dh_out=None):
    """One chunk of rows h (c, H): logits, the token rows' columns, per-row losses with dz written over the logits,
    and the gradients accumulated into grads = (dh, dw, db, dr). Returns (loss sum, the chunk's dh or None)."""
    logits = torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())
    if rows is not None:
        index, r = rows
        logits.index_copy_(1, index, torch.addmm(b[index], h, r.t()) if b is not None else torch.mm(h, r.t()))
    total = _ce_rows(logits, y, scale, want_grad, ignore_index).sum()
    dh, dw, db, dr = grads
    if not want_grad:
        return total, None
    if db is not None:
        db += logits.sum(0, dtype=torch.float32)
    dz_rows = None
    if rows is not None:  # W's rows I are not read: their logit gradient goes through R instead
        dz_rows = logits.index_select(1, index)
        logits.index_fill_(1, index, 0)
    dh_chunk = None
    if dh is not None:
        dh_chunk = torch.mm(logits, w, out=dh_out) if dh_out is not None else torch.mm(logits, w)
        if dz_rows is not None:
            dh_chunk.addmm_(dz_rows, r)  # dz W' = dz[:, not I] W[not I] + dz[:, I] R
    if dw is not None:
        dw.addmm_(logits.t(), h)
    if dr is not None:
        dr += torch.mm(dz_rows.t(), h).float()
    return total, dh_chunk


def _fixed_shape_pass(hidden, w, b, labels, ignore_index, chunk, grads, want_grad, rows) -> torch.Tensor:
    """The sum over kept rows without selecting them: every row, contiguous chunks, ignored rows weigh 0.
    No host synchronisation and no data-dependent shape, so a CUDA graph can record it (training/graphs.py);
    the rows it computes for nothing are the ignored ones (none in packed or full-length batches)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = grads[0]
    for start in range(0, hidden.shape[0], chunk):
        out = None if dh is None else dh[start : start + chunk]
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        total += _chunk(h, w, b, y, 1.0, want_grad, ignore_index, rows, grads, dh_out=out)[0]
    return total


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """loss = scale * sum_t CE(h_t W^T + b, y_t), computed chunk by chunk with its gradients.

    Backward derivation: d lse(z)/dz = softmax(z) and d z[y]/dz = onehot(y), so dL/dz_t =
    scale * (softmax(z_t) - onehot(y_t)); z_t = h_t W^T + b gives dL/dh_t = dL/dz_t W,
    dL/dW = sum_t (dL/dz_t)^T h_t, dL/db = sum_t dL/dz_t. All formed in forward; backward multiplies
    them by the incoming scalar gradient. Token rows (row_index I (k,), row_values R (k, H), lora/token_rows.py)
    replace W's rows I: z_t[I] = h_t R^T (+ b[I]), dL/dR = sum_t (dL/dz_t)[I]^T h_t (fp32), and those rows of dW
    are zero.
    """

    @staticmethod
    @_runtime.autocast_off
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk, row_index, row_values):
        dtype = hidden.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        want_r = row_values is not None and ctx.needs_input_grad[8]
        want_grad = want_h or want_w or want_b or want_r
        rows = None if row_values is None else (row_index, row_values.detach().to(dtype))
        grads = (
            torch.zeros_like(hidden) if want_h else None,
            torch.zeros_like(weight, dtype=dtype) if want_w else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if want_b else None,
            torch.zeros(row_values.shape, dtype=torch.float32, device=hidden.device) if want_r else None,
        )
        ctx.weight_dtype = weight.dtype
        ctx.values_dtype = None if row_values is None else row_values.dtype
        if reduction == "sum" and fixed_shape_wanted(hidden):
            total = _fixed_shape_pass(hidden, w, b, labels, ignore_index, chunk, grads, want_grad, rows)
            _save(ctx, grads, bias)
            return total
        kept = (labels != ignore_index).nonzero().squeeze(1)
        n = kept.numel()
        scale = 1.0 / n if (reduction == "mean" and n > 0) else 1.0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            idx = kept[start : start + chunk]
            h, y = hidden.index_select(0, idx), labels.index_select(0, idx)
            part, dh_chunk = _chunk(h, w, b, y, scale, want_grad, ignore_index, rows, grads)
            total += part
            if dh_chunk is not None:
                grads[0].index_copy_(0, idx, dh_chunk)
        loss = total / n if reduction == "mean" else total  # 0 / 0 = NaN with no kept row, as torch
        _save(ctx, grads, bias)
        return loss

    @staticmethod
    @_runtime.autocast_off
    def backward(ctx, grad_loss):
        dh, dw, db, dr = ctx.saved_tensors

        def scaled(t):
            return None if t is None else t * grad_loss.to(t.dtype)

        dw = None if dw is None else scaled(dw).to(ctx.weight_dtype)
        dr = None if dr is None else scaled(dr).to(ctx.values_dtype)
        return scaled(dh), dw, scaled(db), None, None, None, None, None, dr


def _save(ctx, grads, bias) -> None:
    dh, dw, db, dr = grads
    ctx.save_for_backward(dh, dw, None if db is None else db.to(bias.dtype), dr)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    rows=None,
) -> torch.Tensor:
    """CE(hidden W^T + b, labels) for hidden (T, H) (or (..., H) with labels (...)), fp32 scalar.

    reduction "mean" (over labels != ignore_index; NaN when there are none, as torch) or "sum".
    rows: trainable token rows (lora/token_rows.py `Rows`: index (k,), values (k, H)) replacing W's rows index.
    The reference on CPU tensors.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels2 = labels.reshape(-1)
    if not _runtime.use_triton(hidden):
        return fused_linear_cross_entropy_reference(hidden2, weight, labels2, bias, ignore_index, reduction, rows=rows)
    chunk = chunk_size or default_chunk(weight.shape[0], hidden.dtype)
    index, values = (None, None) if rows is None else (rows.index, rows.values)
    return FusedLinearCrossEntropyFunction.apply(
        hidden2, weight, bias, labels2, ignore_index, reduction, chunk, index, values
    )

"""Next-token loss as a SUM over target tokens, computed from hidden states in chunks.

    loss_sum = sum_{rows i with label != -100} ( logsumexp(h_i W^T) - (h_i W^T)[y_i] )

`lm_loss_sum(model, batch)` runs the model's backbone to hidden states (B, T, D), shifts the labels (the row at
position t is scored against token t+1) and calls `chunked_lm_loss` with the output head's weight W (V, D).
`chunked_lm_loss` touches only the target rows, `chunk` rows at a time: fp32 logits (chunk, V) exist for one
chunk, and the gradient w.r.t. the hidden rows, (softmax - onehot) W, is computed in the same pass, so neither
the (B, T, V) logits nor any vocabulary-sized tensor is kept for backward (what HF's `model(...).loss` keeps).
Completion-only data makes it cheaper still: prompt rows never reach the head. This is the place for a fused
linear-cross-entropy kernel later; the pure-PyTorch pass is the reference.

Dtype policy: the head matmul runs in W's dtype (autocast may lower it to bf16/fp16 on CUDA), logits and
the loss are fp32, grad_hidden is cast to hidden's dtype, grad_W (only when the head is trainable) is fp32.

`forward_batch` moves a Batcher batch to the device as the model's forward arguments. The validation pass is the
objectives' `evaluate` (lorafuse.training.objectives.base), SFT's through this loss.

Trainable token rows (lora/token_rows.py, `head_rows`) replace k rows of the head: their logit columns are
h R^T in each chunk, and the loss hands R its gradient (the same columns of the logit gradient, times h).

Heads that are not a bias-free `nn.Linear` (LoRA on lm_head, modules_to_save copies), logit soft-capping or
scaling, and MoE auxiliary losses fall back to the model's logits + a summed fp32 cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.accel import accel_state
from lorafuse.training.runtime import Precision

IGNORE_INDEX = -100
_LOGIT_ELEMENTS = 2**25  # fp32 logits per chunk: 128 MB (+ the same for the softmax)


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    rows=None,
) -> torch.Tensor:
    """sum over rows with labels != -100 of cross_entropy(hidden @ W^T, labels), fp32 scalar.

    hidden (N, D), lm_head_weight (V, D), labels (N,) already aligned with the rows (shifted by the caller).
    `chunk` rows at a time (default: 2^25 / V). Differentiable w.r.t. hidden and W. rows: trainable token rows
    (lora/token_rows.py `Rows`: index (k,), values (k, D)) that replace W's rows index; differentiable w.r.t.
    rows.values (d loss/d values = sum_i (p_i - onehot_i)[index]^T h_i).
    """
    chunk = chunk or max(1, _LOGIT_ELEMENTS // lm_head_weight.shape[0])
    index, values = (None, None) if rows is None else (rows.index, rows.values)
    wants = (hidden, lm_head_weight) + (() if values is None else (values,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in wants):
        return _ChunkedLMLoss.apply(hidden, lm_head_weight, labels, chunk, index, values)
    return _chunked_pass(hidden, lm_head_weight, labels, chunk, False, False, index, values, False)[0]


def _chunked_pass(hidden, weight, labels, chunk, want_h, want_w, index=None, values=None, want_r=False):
    """(loss_sum, grad_hidden | None, grad_weight | None, grad_values | None) for d(loss_sum).

    With rows (index, values): the logit columns `index` are h @ values^T, so d hidden is dz[:, not index] @
    W[not index] + dz[:, index] @ values (W's rows `index` are not read and get no gradient)."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    grad_r = torch.zeros(values.shape, dtype=torch.float32, device=values.device) if want_r else None
    r = None if values is None else values.detach().to(weight.dtype)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        h = hidden.index_select(0, idx).to(weight.dtype)  # (c, D)
        logits = (h @ weight.t()).float()  # (c, V): the only vocabulary-sized tensor, freed each chunk
        if r is not None:
            logits.index_copy_(1, index, (h @ r.t()).float())
        y = labels.index_select(0, idx)
        lse = torch.logsumexp(logits, dim=1)
        total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
        if want_h or want_w or want_r:
            d = logits.sub_(lse[:, None]).exp_()  # softmax, in place: d(lse - logit_y)/d logits = p - onehot
            d[torch.arange(idx.numel(), device=d.device), y] -= 1.0
            d_rows = None
            if r is not None:
                d_rows = d.index_select(1, index)  # (c, k)
                d.index_fill_(1, index, 0.0)
            if want_h:
                gh = d.to(weight.dtype) @ weight
                if r is not None:
                    gh += d_rows.to(weight.dtype) @ r
                grad_h.index_copy_(0, idx, gh.to(hidden.dtype))
            if want_w:
                grad_w += d.t() @ h.float()
            if want_r:
                grad_r += d_rows.t() @ h.float()
    return total, grad_h, grad_w, grad_r


class _ChunkedLMLoss(torch.autograd.Function):
    """Forward computes the loss AND its gradients (one pass over the logits); backward scales them.

    d loss / d hidden_i = (softmax(h_i W^T) - onehot(y_i)) W,  d loss / d W = sum_i (p_i - onehot(y_i))^T h_i;
    with token rows, W's rows `index` are `values` in both, and d loss / d values = the rows `index` of d loss / d W.
    Saved for backward: grad_hidden (N, D) in hidden's dtype (+ grad_W fp32 when W is trainable, + grad_values).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, index, values):
        want_h, want_w, want_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5]
        total, grad_h, grad_w, grad_r = _chunked_pass(
            hidden, weight, labels, chunk, want_h, want_w, index, values, want_r
        )
        ctx.save_for_backward(grad_h, grad_w, grad_r)
        ctx.weight_dtype = weight.dtype
        ctx.values_dtype = None if values is None else values.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_r = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        gr = (grad_r * grad_out).to(ctx.values_dtype) if grad_r is not None else None
        return gh, gw, None, None, None, gr


def lm_loss_sum(model, batch: dict, head: nn.Linear | None = None, fused: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's target tokens (fp32 scalar).

    batch: the model's forward kwargs plus "labels" (B, T), unshifted (HF convention, -100 = not trained).
    head: `accel.simple_head(model)`, or None for the model's own logits. fused: on CUDA, the Triton fused
    linear-cross-entropy kernel (lorafuse.kernels.cross_entropy) instead of the PyTorch chunked pass.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): row t is scored against token t+1
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    from lorafuse.lora.token_rows import head_rows

    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, D)
    state = accel_state(model)
    stage = None if state is None else state.head_stage
    if stage is not None and stage.streams(hidden.shape[:-1].numel()):  # the host head in vocabulary chunks
        from lorafuse.kernels.streamed_head import streamed_head_cross_entropy

        return streamed_head_cross_entropy(hidden.flatten(0, 1), shifted.flatten(), stage.chunks(), stage.target_rows)
    # a head kept in host memory (train.head_on_host) arrives staged for this loss only
    weight = head.weight if stage is None else stage.take()
    rows = head_rows(model)  # trainable token rows (lora/token_rows.py) replace some of the head's rows
    if fused:
        from lorafuse.kernels.cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(hidden.flatten(0, 1), weight, shifted.flatten(), reduction="sum", rows=rows)
    return chunked_lm_loss(hidden.flatten(0, 1), weight, shifted.flatten(), rows=rows)


def count_targets(batch: dict) -> int:
    """Trained predictions in a batch: labels != -100 after the shift."""
    if "num_target_tokens" in batch:
        return int(batch["num_target_tokens"])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_inputs(batch: dict) -> int:
    """Real (non-pad) tokens in a batch."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()


def forward_batch(model, batch: dict, precision: Precision) -> dict:
    """A Batcher batch -> forward kwargs on the device (packed masks in the form the attention wants) + labels."""
    from lorafuse.data.collate import model_inputs
    from lorafuse.data.pair_layout import PLAN_KEYS, SCORING_KEYS

    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    kwargs = model_inputs(batch, attn, precision.dtype, precision.device)
    kwargs["labels"] = batch["labels"].to(precision.device, non_blocking=True)
    for key in (*SCORING_KEYS, *PLAN_KEYS):  # shared-prompt pair rows: what the loss and the attention plan read
        if key in batch:
            value = batch[key]
            kwargs[key] = value.to(precision.device, non_blocking=True) if torch.is_tensor(value) else value
    return kwargs

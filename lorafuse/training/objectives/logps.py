"""Per-sequence log-probabilities of the trained tokens, from hidden states through the output head in chunks.

    logp_r = sum_{t : y_{r,t} != -100} ( z_{r,t}[y_{r,t}] - logsumexp(z_{r,t}) ),   z_{r,t} = h_{r,t} W^T

for every row r of a batch: hidden states h (R, T, D) of the backbone, head weight W (V, D), and y the labels
shifted by one (position t is scored against token t+1, -100 = not trained). Preference objectives build on it:
DPO and ORPO need one number per response (a row), not the batch's summed cross-entropy.

Like `lorafuse.training.loss.chunked_lm_loss`, only trained rows reach the head, `chunk` token rows at a time: one fp32
(chunk, V) logits block exists at once, and the gradient w.r.t. the hidden rows is formed in the same pass,
    d logp_r / d h_{r,t} = (onehot(y_{r,t}) - softmax(z_{r,t})) W,
so neither the (R, T, V) logits nor anything vocabulary-sized is kept for backward. Backward scales each token's
row by the incoming gradient of its sequence. A trainable head (lora.modules_to_save) gets
    d / d W = sum_t g_{r(t)} (onehot(y_t) - softmax(z_t))^T h_t
from a second chunked pass in backward (the per-sequence weights g are known only then).

Dtype policy: the head matmul runs in W's dtype (autocast may lower it on CUDA), logits and log-probs are fp32, the
hidden-state gradient is cast to the hidden states' dtype, a head gradient is accumulated in fp32.

The fused CUDA path (lorafuse.kernels.cross_entropy) can supply the same sums: its per-row pass `_ce_rows` already
returns lse - z[y] = -log p per token, so the forward is that pass with scale 1 followed by an index_add of the
negated values into the sequences; the backward needs a per-token scale vector (g of the token's sequence) in place
of the kernel's scalar `scale`, or, for a frozen head, the unscaled dh of the forward (as here) scaled by row.

Heads that are not a bias-free `nn.Linear` (see `lorafuse.accel.simple_head`) use the model's logits and a
log-softmax instead, which materialises (R, T, V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafuse.accel import accel_state
from lorafuse.data.pair_layout import PLAN_KEYS, SCORING_KEYS
from lorafuse.kernels.cross_entropy import fixed_shape_wanted
from lorafuse.lora.token_rows import head_rows

IGNORE_INDEX = -100
_LOGIT_ELEMENTS = 2**25  # fp32 logits per chunk: 128 MB (+ the same for the softmax), as the SFT loss


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """(R, T) labels aligned with the positions that predict them: row t holds token t+1 (-100 at the end)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Trained predictions per row (R,), int64: labels != -100 after the shift."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def sequence_logps(model, inputs: dict, head=None, fused: bool = False) -> torch.Tensor:
    """(R,) fp32: the summed log-probability of each response's trained tokens (differentiable); R = the rows, or 2B
    for B shared-prompt pair rows (`lorafuse.data.pair_layout`: chosen answers, then rejected ones, as separate rows).

    inputs: the model's forward kwargs plus "labels" (rows, T), unshifted (HF convention), and a shared batch's
    scoring and attention-plan keys. head: `lorafuse.accel.simple_head(model)` or None for the model's own logits.
    fused: reserved for the CUDA kernel (see the module docstring); the chunked PyTorch pass runs on every device.
    """
    forward = forward_kwargs(inputs)
    shifted = shifted_labels(inputs["labels"])
    layout = scoring_layout(inputs)
    if head is None or head_rows(model) is not None:  # trainable token rows reach the head through its forward hook
        logits = model(**forward, use_cache=False).logits.float()  # (R, T, V)
        logp = logits.log_softmax(-1)
        picked = logp.gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1) * (shifted != IGNORE_INDEX)
        if layout is None:
            return picked.sum(1)
        row_of, rows, (pos, y, seq) = layout
        out = torch.zeros(rows, dtype=torch.float32, device=picked.device).index_add_(0, row_of, picked.flatten())
        first = logp.flatten(0, 1).index_select(0, pos).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
        return out.index_add_(0, seq, first * (y != IGNORE_INDEX))
    hidden = model.base_model(**forward, use_cache=False).last_hidden_state  # (R, T, D)
    state = accel_state(model)
    stage = None if state is None else state.head_stage
    weight = head.weight if stage is None else stage.take()  # a head in host memory arrives staged for this loss
    if layout is None:
        return chunked_sequence_logps(hidden, weight, shifted)
    row_of, rows, extra = layout
    return chunked_sequence_logps(hidden, weight, shifted, row_of=row_of, rows=rows, extra=extra)


def forward_kwargs(inputs: dict) -> dict:
    """The model's forward kwargs in `inputs`: without the labels and the loss's keys; a shared batch's attention
    plan as one `pair_layout` (split, gather, assemble), which the fast path's attention reads
    (`lorafuse.accel.fast_path`) and other attention ignores (the 4-D mask then gives the same result)."""
    skip = ("labels", "ref_logps", *SCORING_KEYS, *PLAN_KEYS)
    forward = {k: v for k, v in inputs.items() if k not in skip}
    if "pair_split" in inputs:
        forward["pair_layout"] = tuple(inputs[k] for k in PLAN_KEYS)
    return forward


def scoring_layout(inputs: dict):
    """None for separate rows; for B shared-prompt pair rows of width T: (row_of (B*T,) the response each shifted
    label scores, 2B, (positions, tokens, responses) (B,) each: the first rejected tokens, scored apart)."""
    if "pair_seq" not in inputs:
        return None
    seq, first = inputs["pair_seq"], inputs["pair_first"]
    pairs = seq.shape[0]
    row_of = F.pad(seq[:, 1:], (0, 1)).flatten()  # aligned with the shifted labels (position t scores token t+1)
    rejected = pairs + torch.arange(pairs, device=seq.device)
    return row_of, 2 * pairs, (first[:, 0], first[:, 1], rejected)


def sequence_tokens(inputs: dict) -> torch.Tensor:
    """(R,) int64: the trained predictions of each response (R as `sequence_logps`)."""
    layout = scoring_layout(inputs)
    if layout is None:
        return response_tokens(inputs["labels"])
    row_of, rows, (_, y, seq) = layout
    valid = shifted_labels(inputs["labels"]).flatten() != IGNORE_INDEX
    counts = torch.zeros(rows, dtype=torch.long, device=row_of.device).index_add_(0, row_of, valid.long())
    return counts.index_add_(0, seq, (y != IGNORE_INDEX).long())


def chunked_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    *,
    row_of: torch.Tensor | None = None,
    rows: int | None = None,
    extra: tuple | None = None,
) -> torch.Tensor:
    """(rows,) fp32 sums of log softmax(hidden W^T)[labels] over the positions with labels != -100.

    hidden (R, T, D), weight (V, D), labels (R, T) already shifted. row_of (R*T,): the sum each position adds to
    (default: its row; rows: how many sums, default R). extra: (positions (E,) into the R*T tokens, tokens (E,),
    sums (E,)) predictions scored besides the labels (a position may score one label and extras). Differentiable
    w.r.t. hidden and weight.
    """
    n_rows, width = labels.shape
    chunk = chunk or max(1, _LOGIT_ELEMENTS // weight.shape[0])
    if row_of is None:
        row_of = torch.arange(n_rows, device=labels.device).repeat_interleave(width)  # (R*T,) sequence of each token
    if extra is None:
        none = torch.zeros(0, dtype=torch.long, device=labels.device)
        extra = (none, none, none)
    args = (hidden.flatten(0, 1), weight, labels.flatten(), row_of, rows or n_rows, chunk, *extra)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _SequenceLogps.apply(*args)
    return _chunked_pass(*args)[0]


def _head_block(h, weight, y, keep):
    """(logits (c, V) fp32 minus their lse, picked log-probs (c,)) of hidden rows h (c, D) for tokens y (c,)."""
    logits = (h @ weight.t()).float()  # (c, V): the only vocabulary-sized tensor, freed each chunk
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, y[:, None]).squeeze(1) - lse
    return logits.sub_(lse[:, None]), (picked if keep is None else picked * keep)


def _grad_block(shifted_logits, y, keep):
    """d logp / d logits = onehot(y) - softmax, in place of the (c, V) block; zero rows where keep is 0."""
    d = shifted_logits.exp_().neg_()
    d[torch.arange(y.numel(), device=d.device), y] += 1.0
    return d if keep is None else d.mul_(keep[:, None])


def _chunked_pass(
    hidden, weight, labels, row_of, rows, chunk, e_pos, e_y, e_row, want_h=False, token_scale=None, want_w=False
):
    """(logps (R,), grad_hidden | None, grad_weight | None, grad_extra (E, D) | None).

    grad_hidden is d logp_{r(t)} / d h_t for every token (unscaled); grad_extra the same for each extra prediction;
    grad_weight is sum_t token_scale_t * d logp_{r(t)} / d W (token_scale: (N + E,) fp32, the backward's per-token
    weights, the extras last).

    The trained tokens are gathered first (a host synchronisation for their count). Where shapes must stay fixed
    (a CUDA graph capture, or the eager steps before one: `kernels.cross_entropy.fixed_shape_wanted`) every token
    goes through the head instead, the untrained ones weighted 0: the same sums, more head FLOPs. The extras (a few)
    always go through, weighted 0 where their token is -100.
    """
    valid = labels != IGNORE_INDEX
    fixed = fixed_shape_wanted(hidden)
    idx_all = torch.arange(labels.numel(), device=labels.device) if fixed else valid.nonzero().squeeze(1)
    logps = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    for start in range(0, idx_all.numel(), chunk):
        idx = idx_all[start : start + chunk]
        h = hidden.index_select(0, idx).to(weight.dtype)  # (c, D)
        y = labels.index_select(0, idx).clamp(min=0)
        keep = valid.index_select(0, idx).float() if fixed else None  # (c,): 0 for an untrained token
        shifted, picked = _head_block(h, weight, y, keep)
        logps.index_add_(0, row_of.index_select(0, idx), picked)
        if not (want_h or want_w):
            continue
        d = _grad_block(shifted, y, keep)
        if want_h:
            grad_h.index_copy_(0, idx, (d.to(weight.dtype) @ weight).to(hidden.dtype))
        if want_w:
            grad_w += (d * token_scale.index_select(0, idx)[:, None]).t() @ h.float()
    grad_e = None
    if e_pos.numel():
        h = hidden.index_select(0, e_pos).to(weight.dtype)
        keep = (e_y != IGNORE_INDEX).float()
        shifted, picked = _head_block(h, weight, e_y.clamp(min=0), keep)
        logps.index_add_(0, e_row, picked)
        if want_h or want_w:
            d = _grad_block(shifted, e_y.clamp(min=0), keep)
            grad_e = (d.to(weight.dtype) @ weight).to(hidden.dtype) if want_h else None
            if want_w:
                grad_w += (d * token_scale[labels.numel() :, None]).t() @ h.float()
    return logps, grad_h, grad_w, grad_e


class _SequenceLogps(torch.autograd.Function):
    """Forward computes the log-probs and d logp / d hidden per token in one pass; backward scales the token rows
    by their sequence's incoming gradient (and recomputes the chunks for a trainable head).

    Saved for backward: grad_hidden (N, D) and the extras' (E, D) in hidden's dtype; with a trainable head also
    hidden, weight, labels.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, row_of, rows, chunk, e_pos, e_y, e_row):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        extra = (e_pos, e_y, e_row)
        logps, grad_h, _, grad_e = _chunked_pass(hidden, weight, labels, row_of, rows, chunk, *extra, want_h=want_h)
        ctx.save_for_backward(grad_h, grad_e, row_of, *extra, *((hidden, weight, labels) if want_w else ()))
        ctx.rows, ctx.chunk, ctx.want_w = rows, chunk, want_w
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_e, row_of, e_pos, e_y, e_row, *kept = ctx.saved_tensors
        g = grad_out.float()
        token_scale = g.index_select(0, row_of)  # (N,): g of each token's sequence
        gh = None
        if grad_h is not None:
            gh = grad_h * token_scale[:, None].to(grad_h.dtype)
            if grad_e is not None:
                gh.index_add_(0, e_pos, grad_e * g.index_select(0, e_row)[:, None].to(grad_e.dtype))
        gw = None
        if ctx.want_w:
            hidden, weight, labels = kept
            scale = torch.cat([token_scale, g.index_select(0, e_row)])
            extra = (e_pos, e_y, e_row)
            _, _, gw, _ = _chunked_pass(hidden, weight, labels, row_of, ctx.rows, ctx.chunk, *extra, None, scale, True)
            gw = gw.to(weight.dtype)
        return gh, gw, None, None, None, None, None, None, None

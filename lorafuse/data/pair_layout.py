"""Preference pairs with the prompt run once: one row per pair holds the prompt, the chosen answer and the rejected
answer, and the rejected answer does not see the chosen one.

A pair's two rows (`Batcher` with pairs: the B chosen rows, then the B rejected rows) begin with the same prompt. Run
as two rows, every layer computes the prompt twice. `share_prompts` lays pair b out as ONE row

    [ prefix (s_b tokens) | chosen suffix (c_b) | rejected suffix (r_b) | padding ]        width W

where s_b is the longest common start of the two rows that holds no trained label (the prompt), and
    position ids  0 .. s_b-1 | s_b .. s_b+c_b-1 | s_b .. s_b+r_b-1   (the rejected suffix continues the prompt)
    attention     query t sees key u <= t when u is in the prefix or in t's own part (`shared_prompt_mask`)
so every token sees exactly the keys and positions it sees in its own row: the same log-probs, losses and gradients,
with s_b fewer tokens through every matmul. The first rejected token is predicted from the last prompt token (where
the chosen answer's first token is predicted too), not from the token before it in the row: its label is taken out
of `labels` and scored as `pair_first` = (flat position b*W + s_b - 1, token).

Keys of the shared batch (CPU tensors; `model_inputs` and `lorafuse.training.objectives.logps` read them):
    input_ids, labels, position_ids   (B, W) int64; labels -100 outside the answers and at the first rejected token
    pair_segments  (B, W) int64: 0 prefix, 1 chosen, 2 rejected, 3 padding
    pair_seq       (B, W) int64: which response a label belongs to: b for pair b's chosen answer, B + b for its
                   rejected one (the order of the separate rows, so log-probs come out as (2B,) as before)
    pair_first     (B, 2) int64: (b*W + s_b - 1, first rejected token), the token -100 where it is not trained
    pair_split, pair_gather, pair_assemble: the same attention as two causal attentions (`pair_attention_plan`)
    pair_gather_inverse, pair_assemble_inverse: the two gathers' inverse maps, for a backward without atomics
and the pair batch's other keys unchanged (num_pairs, rows, ref_logps, the token counts of the separate rows).

Widths are rounded up to `multiple` (64 on CUDA, as padded rows: few shapes, so CUDA graphs can capture them).
"""

from __future__ import annotations

import torch

IGNORE = -100
PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
# the keys a shared batch has beyond the model's own inputs; the loss reads them, the model's forward does not
SCORING_KEYS = ("pair_seq", "pair_first")
PLAN_KEYS = ("pair_split", "pair_gather", "pair_assemble", "pair_gather_inverse", "pair_assemble_inverse")


def _round_up(n: int, multiple: int, cap: int | None = None) -> int:
    n = -(-n // multiple) * multiple
    return n if cap is None else min(n, cap)


def _row_lengths(batch: dict) -> list[int]:
    if "seq_lens" in batch:
        return [int(lens[0]) for lens in batch["seq_lens"]]
    return batch["attention_mask"].sum(1).tolist()


def shared_prefix(ids_c, labels_c, ids_r, labels_r, n_c: int, n_r: int) -> int:
    """The tokens the two rows share from the start with no trained label in either (the prompt)."""
    n = min(n_c, n_r)
    same = (ids_c[:n] == ids_r[:n]) & (labels_c[:n] == IGNORE) & (labels_r[:n] == IGNORE)
    differ = (~same).nonzero()
    return int(differ[0]) if len(differ) else n


def share_prompts(batch: dict, multiple: int = 1) -> dict:
    """A pair batch (2B right-padded rows: B chosen, then B rejected) as B shared-prompt rows (module docstring)."""
    pairs = int(batch["num_pairs"])
    ids, labels, lengths = batch["input_ids"].cpu(), batch["labels"].cpu(), _row_lengths(batch)  # built on the host
    parts = []  # per pair: (s, c, r)
    for b in range(pairs):
        n_c, n_r = lengths[b], lengths[pairs + b]
        s = shared_prefix(ids[b], labels[b], ids[pairs + b], labels[pairs + b], n_c, n_r)
        parts.append((s, n_c - s, n_r - s))
    width = _round_up(max(s + c + r for s, c, r in parts), multiple)
    out_ids = torch.zeros((pairs, width), dtype=torch.long)
    out_labels = torch.full((pairs, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((pairs, width), dtype=torch.long)
    segments = torch.full((pairs, width), PAD, dtype=torch.long)
    seq = torch.zeros((pairs, width), dtype=torch.long)
    first = torch.zeros((pairs, 2), dtype=torch.long)
    for b, (s, c, r) in enumerate(parts):
        chosen, rejected, end = slice(s, s + c), slice(s + c, s + c + r), s + c + r
        out_ids[b, : s + c] = ids[b, : s + c]
        out_ids[b, rejected] = ids[pairs + b, s : s + r]
        out_labels[b, chosen] = labels[b, s : s + c]
        out_labels[b, rejected] = labels[pairs + b, s : s + r]
        positions[b, : s + c] = torch.arange(s + c)
        positions[b, rejected] = torch.arange(s, s + r)
        positions[b, end:] = torch.arange(width - end)  # padding: a sequence of its own, as packed rows' tails
        segments[b, :s], segments[b, chosen], segments[b, rejected] = PREFIX, CHOSEN, REJECTED
        seq[b, chosen], seq[b, rejected] = b, pairs + b
        # the first rejected token is predicted by the last prompt token; without a prompt nothing predicts it,
        # as nothing predicts the first token of a row
        target = int(labels[pairs + b, s]) if r and s else IGNORE
        if r:
            out_labels[b, s + c] = IGNORE
        first[b] = torch.tensor([b * width + max(s - 1, 0), target])
    rows_keys = ("input_ids", "labels", "attention_mask", "right_padded", "seq_lens")  # the separate rows' layout
    keep = {k: v for k, v in batch.items() if k not in rows_keys}
    return {
        **keep,
        "input_ids": out_ids,
        "labels": out_labels,
        "position_ids": positions,
        "pair_segments": segments,
        "pair_seq": seq,
        "pair_first": first,
        **pair_attention_plan(parts, width, multiple),
    }


def pair_attention_plan(parts: list[tuple[int, int, int]], width: int, multiple: int = 1) -> dict:
    """The shared rows' attention as two plain causal attentions, for SDPA's causal kernel (a masked one is slower).

    1. The first `pair_split` = max(s_b + c_b) columns of every row, causal: exact for the prefix and the chosen
       answer, which come first and see nothing after them.
    2. `pair_gather` (B * L2,) flat indices into the (B * W) tokens: each row's prefix then its rejected suffix,
       L2 = max(s_b + r_b) (padding past a row's end repeats its last column: causal attention never lets a real
       token see a later one). Causal over those: exact for the rejected answer.
    `pair_assemble` (B * W,) picks each token's output from the two results laid side by side per row,
    (B, pair_split + L2): token t of row b from the first for t < s_b + c_b, from the second for the rejected suffix.

    The inverse maps give each gather's source its one entry that matters: `pair_gather_inverse` (B * W,) the entry
    of `pair_gather` that reads token p (its prefix or rejected suffix), `pair_assemble_inverse` (B * (split + L2),)
    the token whose output is read from result i (t < split outside the rejected suffix, or the rejected suffix);
    B * L2 and B * W mark sources with none. The entries left out are padding, and so are the results they feed:
    no real token attends to them (causal order, padding last) and no loss reads them, so their gradient is exactly
    zero, and a backward that gathers the gradient through the inverse maps (`lorafuse.accel.fast_path`) equals the
    atomic scatter-add that inverts `index_select`.
    """
    pairs = len(parts)
    split = _round_up(max(s + c for s, c, _ in parts), multiple, width)
    second = _round_up(max(s + r for s, _, r in parts), multiple, width)
    gather = torch.empty((pairs, second), dtype=torch.long)
    assemble = torch.empty((pairs, width), dtype=torch.long)
    gather_inverse = torch.full((pairs, width), pairs * second, dtype=torch.long)
    assemble_inverse = torch.full((pairs, split + second), pairs * width, dtype=torch.long)
    t = torch.arange(width)
    for b, (s, c, r) in enumerate(parts):
        row = torch.cat([torch.arange(s), torch.arange(s + c, s + c + r)])
        gather[b, : s + r] = row
        gather[b, s + r :] = width - 1
        gather_inverse[b, row] = b * second + torch.arange(s + r)
        from_second = split + s + (t - s - c)  # the rejected suffix's place in the second attention
        rejected = (t >= s + c) & (t < s + c + r)
        assemble[b] = torch.where(rejected, from_second, torch.where(t < split, t, split + second - 1))
        read = rejected | (t < split)
        assemble_inverse[b, assemble[b, read]] = b * width + t[read]
    offsets = torch.arange(pairs)[:, None]
    return {
        "pair_split": split,
        "pair_gather": (gather + offsets * width).flatten(),
        "pair_assemble": (assemble + offsets * (split + second)).flatten(),
        "pair_gather_inverse": gather_inverse.flatten(),
        "pair_assemble_inverse": assemble_inverse.flatten(),
    }


def shared_prompt_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, W, W) bool, True where query t may attend key u: u <= t, and u in the prefix or in t's own part."""
    width = segments.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril_()
    key, query = segments[:, None, :], segments[:, :, None]
    return (causal & ((key == PREFIX) | (key == query)))[:, None]

"""`Batcher`: deterministic, resumable micro-batches, padded or packed.

Order: epoch e uses the permutation `numpy.random.default_rng([seed, e])` (no global RNG involved), so batch k of
epoch e is a pure function of (data, settings, seed, e, k); `epoch_batches(e, start=k)` resumes exactly there.

Padding mode (`packing=False`): `micro_batch_size` examples per batch, right-padded to the longest one (rounded up
to `pad_to_multiple_of`, but never past max_length; the training run uses 64 on CUDA). Keys, tensors of shape (B, T):
    input_ids  int64, pad positions = pad_id
    labels     int64, pad positions = -100 (set directly, never by comparing with pad_id, so EOS == PAD stays trained)
    attention_mask int64, 1 = real token
    right_padded   True: every row's real tokens come first. Under causal attention no real token then sees a pad,
                   so `model_inputs` leaves the mask out for SDPA and eager attention: the same loss and gradients
                   (pads carry no loss and nothing reads them), through SDPA's causal kernel instead of its masked
                   one (3.3x faster attention measured on an H200), and nothing data-dependent for a CUDA graph.
                   flash-attention implementations keep the mask: they drop the pads from the compute.

Packing mode (`packing=True`): sequences are packed once, best-fit decreasing, into rows of at most `max_length`
tokens (the bins are fixed; each epoch shuffles the order of the rows, so `len()` is the same every epoch).
`micro_batch_size` packed rows per batch. Keys:
    input_ids, labels  (B, T) as above; the padding tail of a row is its own pseudo-sequence
    position_ids       (B, T) int64, restarting at 0 for every sequence (and for the padding tail)
    seq_lens           list (per row) of the real sequence lengths
    cu_seqlens         int32 (S + 1,) cumulative lengths over the flattened (B * T) tokens, padding tails included
                       (flash-attention varlen layout); max_seqlen int
  There is deliberately no `attention_mask` key: `model_inputs` builds the (B, 1, T, T) block-diagonal causal mask
  on the model's device (`block_causal_mask`), so no token attends across sequences. A packed batch passed to a
  transformers 5 model with no mask and use_cache=False is also isolated: transformers then derives the same
  blocks from the position_ids restarts (masking_utils.find_packed_sequence_indices); with a 2-D all-ones mask,
  or with a cache, it is NOT (tested).
Pairs mode (`pairs=True`, data.format=preference: data set rows 2k, 2k+1 are pair k's chosen and rejected rows):
`micro_batch_size` pairs per batch, shuffled and sharded as pairs, laid out as 2B padded rows, the B chosen rows
first, then the B rejected rows in the same pair order, so one forward scores both. Extra keys: `num_pairs` B,
`rows` (2B,) int64 the data set rows, and `ref_logps` (2B,) float32 when the data set carries precomputed DPO
reference log-probs (`dataset.ref_logps`, one per row).
Both modes: `num_target_tokens` = count(labels[:, 1:] != -100), the number of trained predictions (for
token-normalised gradient accumulation: sum the per-token losses and divide by the accumulated count);
`num_tokens` real tokens; `num_sequences`.

Sharding (`num_shards > 1`): every rank computes the same global batch list and takes batches shard, shard+S, ...;
the tail is cut so all ranks get the same number of batches.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np
import torch

from lorafuse.data.pair_layout import shared_prompt_mask
from lorafuse.errors import DataError

IGNORE = -100
CUDA_PAD_MULTIPLE = 64  # padded rows' widths on CUDA: a few shapes, so CUDA graphs can capture them


def pack_best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity (best-fit decreasing; deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free_keys: list[int] = []  # sorted distinct free capacities of open bins
    by_free: dict[int, list[int]] = {}  # free capacity -> bin ids (stack)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise DataError(
                f"a sequence of {n} tokens does not fit a packed row of {capacity} tokens.",
                "pack with max_length >= data.max_length (the batcher's max_length).",
            )
        k = bisect.bisect_left(free_keys, n)
        if k < len(free_keys):
            free = free_keys[k]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_keys.pop(k)
        else:
            b, free = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = free - n
        if left not in by_free:
            by_free[left] = []
            bisect.insort(free_keys, left)
        by_free[left].append(b)
    return bins


class Batcher:
    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        pad_id: int | None,
        packing: bool = False,
        max_length: int | None = None,
        seed: int = 42,
        shuffle: bool = True,
        *,
        pad_to_multiple_of: int = 1,
        num_shards: int = 1,
        shard: int = 0,
        pairs: bool = False,
    ):
        if len(dataset) == 0:
            raise DataError("the data set is empty, so there is nothing to batch.", "check data.path.")
        self.dataset, self.micro_batch_size = dataset, int(micro_batch_size)
        self.pad_id = 0 if pad_id is None else int(pad_id)  # any id works: pads are masked and labelled -100
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self.pad_to_multiple_of, self.num_shards, self.shard = pad_to_multiple_of, num_shards, shard
        self.pairs = pairs
        if getattr(dataset, "pairs", False) and not pairs:
            raise DataError(
                "preference pairs batched as single rows would train on the rejected answers as well.",
                "train data.format=preference with train.objective=dpo or orpo, which batch pairs.",
            )
        if pairs and packing:
            raise DataError("preference pairs cannot be packed.", "set data.packing=false for data.format=preference.")
        lengths = (
            np.asarray([len(dataset[i]["input_ids"]) for i in range(len(dataset))])
            if not hasattr(dataset, "lengths")
            else dataset.lengths
        )
        self.max_length = int(max_length or lengths.max())
        # units: what one batch row holds (one example, or one packed bin of examples); with pairs, the two rows of a
        # pair (data set rows 2k, 2k+1), laid out by `_collate` as all chosen rows, then all rejected rows
        if pairs:
            self.units = [[i, i + 1] for i in range(0, len(dataset) - 1, 2)]
        else:
            self.units = pack_best_fit(lengths, self.max_length) if packing else [[i] for i in range(len(dataset))]
        n_global = -(-len(self.units) // self.micro_batch_size)
        self._len = n_global // num_shards
        if self._len == 0:
            raise DataError(
                f"{len(self.units)} rows make {n_global} micro-batches, fewer than the {num_shards} "
                "processes that need one each.",
                "use more data or a smaller micro_batch_size.",
            )

    def __len__(self) -> int:
        return self._len

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.units))

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The batches of `epoch` (0-based), beginning at batch index `start` (for exact resume)."""
        order = self._order(epoch)
        mb = self.micro_batch_size
        for k in range(start, self._len):
            g = k * self.num_shards + self.shard
            units = [self.units[u] for u in order[g * mb : (g + 1) * mb]]
            yield self._collate(units)

    def _collate(self, units: list[list[int]]) -> dict:
        return self._collate_pairs(units) if self.pairs else self._collate_rows(units)

    def _collate_rows(self, units: list[list[int]]) -> dict:
        rows = [
            [self.dataset.arrays(i) if hasattr(self.dataset, "arrays") else _as_arrays(self.dataset[i]) for i in unit]
            for unit in units
        ]
        width = max(sum(len(ids) for ids, _ in row) for row in rows)
        m = self.pad_to_multiple_of
        width = max(width, min(-(-width // m) * m, self.max_length))  # rounded up, never past max_length
        B = len(rows)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE, dtype=torch.long)
        seq_lens = []
        for b, row in enumerate(rows):
            pos = 0
            for ids, lab in row:
                input_ids[b, pos : pos + len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
                labels[b, pos : pos + len(ids)] = torch.from_numpy(np.asarray(lab, dtype=np.int64))
                pos += len(ids)
            seq_lens.append([len(ids) for ids, _ in row])
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "seq_lens": seq_lens,
            "num_target_tokens": int((labels[:, 1:] != IGNORE).sum()),
            "num_tokens": sum(map(sum, seq_lens)),
            "num_sequences": sum(map(len, seq_lens)),
        }
        if self.packing:
            batch.update(packed_fields(seq_lens, width))
        else:
            lens = torch.tensor([s[0] for s in seq_lens])
            batch["attention_mask"] = (torch.arange(width)[None, :] < lens[:, None]).long()
            batch["right_padded"] = True
        return batch

    def _collate_pairs(self, units: list[list[int]]) -> dict:
        """B pairs -> 2B padded rows: the chosen rows, then the rejected rows (one forward takes both)."""
        order = [u[0] for u in units] + [u[1] for u in units]
        batch = self._collate_rows([[i] for i in order])
        batch["num_pairs"] = len(units)
        batch["rows"] = torch.tensor(order, dtype=torch.long)  # data set rows, for reference log-probs
        ref = getattr(self.dataset, "ref_logps", None)  # precomputed DPO reference (train.dpo_reference)
        if ref is not None:
            batch["ref_logps"] = torch.from_numpy(np.asarray(ref, dtype=np.float32)[order])
        return batch


def _as_arrays(example: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(example["input_ids"]), np.asarray(example["labels"])


def packed_fields(seq_lens: list[list[int]], width: int) -> dict:
    """position_ids and cu_seqlens for packed rows of `width` tokens (the padding tail is its own segment)."""
    position_ids = torch.empty((len(seq_lens), width), dtype=torch.long)
    flat_lens = []
    for b, lens in enumerate(seq_lens):
        segments = list(lens) + ([width - sum(lens)] if sum(lens) < width else [])
        position_ids[b] = torch.cat([torch.arange(n) for n in segments])
        flat_lens += segments
    cu = torch.zeros(len(flat_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(flat_lens), 0)
    return {"position_ids": position_ids, "cu_seqlens": cu, "max_seqlen": max(flat_lens)}


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query t may attend key s: same sequence and s <= t.

    Sequences are delimited by position_ids restarting at 0. Built wherever position_ids live (on the GPU it
    costs microseconds; on the CPU a (4, 1, 2048, 2048) mask is ~16 M compares, which is why batches don't carry it).
    """
    seg = (position_ids == 0).cumsum(-1)  # (B, T) sequence index
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril_()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def model_inputs(
    batch: dict, attn_implementation: str | None = "sdpa", dtype: torch.dtype = torch.float32, device=None
) -> dict:
    """The keyword arguments for a transformers causal LM's forward (labels excluded: the loop owns the loss).

    Padded batches: input_ids and the (B, T) attention_mask (without it for right-padded rows under SDPA or eager
    attention: see `right_padded` above). Shared-prompt pair rows (`lorafuse.data.pair_layout`): input_ids,
    position_ids and their `shared_prompt_mask`, in the same two forms. Packed batches: input_ids, position_ids and a
    block-diagonal causal mask in the form the attention implementation needs: "eager" adds the mask to the
    scores, so it gets an additive float mask (0 / dtype min) in the compute dtype; "sdpa" and others take the
    (B, 1, T, T) bool mask (transformers uses a 4-D mask as given); flash-attention implementations take no
    mask and find the sequence boundaries from position_ids themselves.
    """
    impl = attn_implementation or "sdpa"
    kw = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"]
    elif not (batch.get("right_padded") and impl in ("sdpa", "eager")):
        kw["attention_mask"] = batch["attention_mask"]
    if device is not None:
        kw = {k: v.to(device, non_blocking=True) for k, v in kw.items()}
    if "pair_segments" in batch:  # preference pairs sharing their prompt (data/pair_layout.py)
        if "flash" in impl:
            raise ValueError(f"shared-prompt pair rows need a 4-D attention mask, which {impl} does not take")
        mask = shared_prompt_mask(batch["pair_segments"].to(kw["input_ids"].device, non_blocking=True))
    elif "position_ids" in kw and "flash" not in impl:
        mask = block_causal_mask(kw["position_ids"])
    if "position_ids" in kw and "flash" not in impl:
        if impl == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        kw["attention_mask"] = mask
    return kw

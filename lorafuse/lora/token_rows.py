"""Trainable token rows: a few rows of the input embedding and the output head trained in place, as peft's
`trainable_token_indices` (peft/tuners/trainable_tokens) trains and saves them.

Math. Token ids I = (i_1 .. i_k), row values R_e (k, D) for the embedding E (V, D) and R_h (k, D) for the head
W (V, D):

    embed(x)_t  = R_e[j]       if x_t = i_j, else E[x_t]          (times the embedding's embed_scale, if it has one)
    logits_t    = h_t W'^T      W' = W with row i_j replaced by R_h[j]

The values REPLACE the base rows (peft's convention, and why it holds for resized vocabularies: the rows a base
grows for new tokens are random, whatever the user's transformers does; replacing makes the function independent
of them). A head tied to the embedding (W is E) has one set of rows, R_h = R_e.

In memory and on disk the names are peft's, so the adapter file needs only the `base_model.model.` prefix:

    <embedding>.token_adapter.trainable_tokens_delta   (k, D)  R_e
    <head>.token_adapter.trainable_tokens_delta        (k, D)  R_h (untied heads only)

and adapter_config.json's `trainable_token_indices` is a list of ids (tied: peft ties the head to the embedding's
rows) or {"embed_tokens": ids, "lm_head": ids} (untied: each module its own rows; peft keys the dict by module name).

How the model reads them, with no vocabulary-sized copy of either table:
  * the embedding: a forward hook puts R_e at the positions that hold an id of I (torch.where over (B, T, D));
  * the head called as a module (the model's own logits): a forward hook overwrites the k logit columns of I with
    h R_h^T, in place;
  * the training loss, which reads the head's weight directly (training/loss.py, kernels/cross_entropy.py): it takes
    `head_rows(head)` and replaces the same k logit columns per chunk; d loss/d R_h = sum_t dz_t[I]^T h_t comes
    out of the logit gradient it forms anyway.
The frozen tables themselves are never written during training; `fold` writes the rows into them (merge).

Dtype policy: R_e, R_h are fp32 masters (like the LoRA weights); each read casts them to the dtype of the
tensor they join (the embedding output, the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafuse.errors import ModelError
from lorafuse.model_state import model_state

ADAPTER_NAME = "token_adapter"  # peft's attribute names (TrainableTokensWrapper.token_adapter.trainable_tokens_delta)
VALUES_NAME = "trainable_tokens_delta"
VALUES_KEY = f".{ADAPTER_NAME}.{VALUES_NAME}"  # the end of each row tensor's name, in memory and in the file


class TokenRows(nn.Module):
    """The trainable rows of one table: ids (k,) and their values (k, D), fp32."""

    def __init__(self, ids: Tensor, values: Tensor, vocab: int):
        super().__init__()
        ids = ids.to(device=values.device, dtype=torch.long)
        self.register_buffer("token_indices", ids, persistent=False)
        setattr(self, VALUES_NAME, nn.Parameter(values.detach().float().clone()))
        # position j of each vocabulary id in `ids`, -1 elsewhere: one gather per forward, no host sync
        lookup = torch.full((vocab,), -1, dtype=torch.long, device=values.device)
        lookup[ids] = torch.arange(ids.numel(), device=values.device)
        self.register_buffer("lookup", lookup, persistent=False)

    @property
    def values(self) -> Tensor:
        return getattr(self, VALUES_NAME)


@dataclass(frozen=True)
class Rows:
    """What a loss needs to read a head with trainable rows: the ids (k,) and their values (k, D)."""

    index: Tensor
    values: Tensor


@dataclass
class TokenRowsState:
    """A model's trainable token rows (`model_state(model).tokens`): the ids, which tables have rows (module names),
    the rows themselves (a tied head reads the embedding's) and the forward hooks that apply them."""

    ids: list[int]
    tied: bool
    embedding: str | None = None
    head: str | None = None
    embed_rows: TokenRows | None = None
    head_rows: TokenRows | None = None
    hooks: list = field(default_factory=list)
    disabled: bool = False  # the base's own rows for a block (lora/disable.py: DPO's reference model)


def state(model: nn.Module) -> TokenRowsState | None:
    return model_state(model).tokens


def _embedding_hook(st: TokenRowsState, module: nn.Module, args, output: Tensor) -> Tensor:
    ids = args[0] if args else None
    if ids is None or st.disabled:
        return output
    rows = st.embed_rows
    pos = rows.lookup[ids]  # (B, T): j, or -1 for an id without a trainable row
    picked = F.embedding(pos.clamp(min=0), rows.values).to(output.dtype)
    scale = getattr(module, "embed_scale", None)
    if scale is not None:
        picked = picked * scale.to(picked.dtype) if torch.is_tensor(scale) else picked * scale
    return torch.where((pos >= 0).unsqueeze(-1), picked, output)


def _head_hook(st: TokenRowsState, module: nn.Module, args, output: Tensor) -> Tensor:
    if st.disabled:
        return output
    rows = st.head_rows
    cols = F.linear(args[0].to(output.dtype), rows.values.to(output.dtype))  # (..., k)
    if module.bias is not None:
        cols = cols + module.bias[rows.token_indices].to(cols.dtype)
    return output.index_copy_(-1, rows.token_indices, cols)  # the linear saved its input, not its output


def head_rows(model: nn.Module) -> Rows | None:
    """The trainable rows the output head reads (its own, or the tied embedding's), or None."""
    st = state(model)
    if st is None or st.head_rows is None or st.disabled:
        return None
    return Rows(st.head_rows.token_indices, st.head_rows.values)


def tables(model: nn.Module) -> tuple[nn.Module, nn.Module | None, bool]:
    """(input embedding, output head or None, tied) of a transformers model."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    return emb, head, tied


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def attach(model: nn.Module, ids, embed_values: Tensor | None, head_values: Tensor | None) -> None:
    """Give the model trainable rows for token `ids`: `embed_values` (k, D) for the input embedding, `head_values`
    (k, D) for an untied head (None: that table gets no rows, e.g. it is trained whole). Tied tables take
    `embed_values` for both. The rows train (requires_grad) from here on."""
    if state(model) is not None:
        raise ModelError("the model already has trainable token rows", "attach token rows once per loaded model")
    emb, head, tied = tables(model)
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    st = TokenRowsState(ids.tolist(), tied)
    if embed_values is not None:
        _check_values(emb.weight, ids, embed_values, "input embedding")
        st.embed_rows = TokenRows(ids, embed_values.to(emb.weight.device), emb.weight.shape[0])
        setattr(emb, ADAPTER_NAME, st.embed_rows)
        st.hooks.append(emb.register_forward_hook(partial(_embedding_hook, st)))
        st.embedding = module_name(model, emb)
    if head is not None and not tied and head_values is not None:
        _check_values(head.weight, ids, head_values, "output head")
        st.head_rows = TokenRows(ids, head_values.to(head.weight.device), head.weight.shape[0])
        setattr(head, ADAPTER_NAME, st.head_rows)
    elif tied and st.embed_rows is not None:
        st.head_rows = st.embed_rows
    if st.head_rows is not None:
        st.hooks.append(head.register_forward_hook(partial(_head_hook, st)))
        st.head = module_name(model, head)
    model_state(model).tokens = st


def _check_values(weight: Tensor, ids: Tensor, values: Tensor, what: str) -> None:
    vocab, dim = weight.shape
    if values.shape != (ids.numel(), dim):
        raise ModelError(
            f"trainable token rows for the {what} have shape {tuple(values.shape)}, expected ({ids.numel()}, {dim})",
            "the adapter was made for another base model: load the base it was trained on",
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ModelError(
            f"trainable token ids up to {int(ids.max())} do not fit the {what}'s {vocab} rows",
            "the adapter adds tokens to the vocabulary: resize the base first, "
            "model.resize_token_embeddings(<vocab size the adapter was trained with>) (docs/tokens.md)",
        )


def peft_indices_entry(model: nn.Module) -> list[int] | dict[str, list[int]] | None:
    """adapter_config.json's `trainable_token_indices` for the model's rows: a list when peft's list rule (the input
    embedding, and a head tied to it) says it; else {module name: ids} per table with rows."""
    st = state(model)
    if st is None:
        return None
    if st.embedding is not None and (st.tied or st.head is None):
        return list(st.ids)
    return {_short(model, name): list(st.ids) for name in (st.embedding, st.head) if name}


def _short(model: nn.Module, name: str) -> str:
    """The last name component when it selects exactly this module under peft's suffix rule, else the full name."""
    short = name.rpartition(".")[2]
    hits = [n for n, _ in model.named_modules() if n == short or n.endswith("." + short)]
    return short if hits == [name] else name


def rows_in_config(model: nn.Module, entry) -> dict[str, tuple[list[int], int]]:
    """{row tensor name in the model (no adapter prefix): (ids, D)} for adapter_config.json's
    `trainable_token_indices` under peft's rules: a list is the input embedding's (and a tied head's); a dict maps
    a module name (or its last components) to ids."""
    if not entry:
        return {}
    emb, head, tied = tables(model)
    emb_name = module_name(model, emb)
    head_name = module_name(model, head) if head is not None else None
    if isinstance(entry, (list, tuple)):
        per = {emb_name: list(entry)}
    else:
        per = {}
        for key, ids in entry.items():
            hit = next((n for n in (emb_name, head_name) if n and (n == key or n.endswith("." + key))), None)
            if hit is None:
                raise ModelError(
                    f"trainable_token_indices names {key!r}, which is neither the input embedding ({emb_name}) nor "
                    f"the output head ({head_name})",
                    "lorafuse trains token rows of those two tables only; load this adapter with peft",
                )
            per[emb_name if tied else hit] = list(ids)
    if len({tuple(ids) for ids in per.values()}) > 1:
        raise ModelError(
            "the adapter trains different token ids in the embedding and the head (trainable_token_indices)",
            "lorafuse trains the same ids in both tables; load this adapter with peft",
        )
    return {f"{name}{VALUES_KEY}": (ids, emb.weight.shape[1]) for name, ids in per.items()}


def attach_saved(model: nn.Module, rows: dict, tensors: dict[str, Tensor]) -> None:
    """`attach` the rows `rows_in_config` named, with their saved values (`tensors`, same names)."""
    if not rows:
        return
    emb, head, tied = tables(model)
    ids = next(iter(rows.values()))[0]
    emb_key = f"{module_name(model, emb)}{VALUES_KEY}"
    head_key = f"{module_name(model, head)}{VALUES_KEY}" if head is not None and not tied else None
    attach(model, ids, tensors.get(emb_key), tensors.get(head_key) if head_key else None)


def fold(model: nn.Module) -> None:
    """Write the rows into the tables (W[I] = R, in the tables' dtype) and remove them: what merge saves."""
    st = state(model)
    if st is None:
        return
    emb, head, _ = tables(model)
    with torch.no_grad():
        for module, rows in ((emb, st.embed_rows), (head, None if st.tied else st.head_rows)):
            if rows is not None:
                module.weight.index_copy_(0, rows.token_indices, rows.values.to(module.weight.dtype))
    detach(model)


def detach(model: nn.Module) -> None:
    """Remove the rows and their hooks (the tables as they were, unless `fold` wrote into them)."""
    st = state(model)
    if st is None:
        return
    for hook in st.hooks:
        hook.remove()
    for module in tables(model)[:2]:
        if module is not None and hasattr(module, ADAPTER_NAME):
            delattr(module, ADAPTER_NAME)
    model_state(model).tokens = None

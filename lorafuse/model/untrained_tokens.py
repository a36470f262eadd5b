"""Untrained token rows: find the tokens the data uses whose embedding or head rows were never trained, say so, and
give them trainable rows started around the trained rows.

Why: a base's special tokens are often rows that pretraining never touched (Llama-3 base's `<|eot_id|>`,
`<|start_header_id|>` and reserved tokens are exactly zero in the embedding and the head). Fine-tuned with a
template that uses them, the model reads a zero vector where the template's structure should be and cannot put
probability on the end-of-turn token, and LoRA on the linear layers cannot move a table row. So lorafuse trains
those rows (lora/token_rows.py: peft's `trainable_token_indices`). Where they start (`lora.token_row_init`):
    sample   (the default) each input-embedding row drawn from a normal distribution with the trained rows' mean
             and per-dimension standard deviation: rows that look like trained ones and differ from each other; the
             output-head rows at the mean of the trained head rows, so a new token starts with a typical probability
             (Hewitt, "Initializing new word embeddings for pretrained language models", 2021). A tied table is
             drawn: it is the model's input.
    mean     every row at the mean of the trained rows, as Unsloth and Axolotl reset them
With the mean, every flagged token of a template reads as the same vector, so the model cannot tell them apart until
training has pulled their rows apart; on the quality benchmark's zeroed template rows that cost most of what a LoRA
run learns in 200 steps, and drawn input rows recovered it; drawn head rows did worse than the mean
(benchmarks/NOTES.md).

A row of a table T (V, D) (input embedding; output head when not tied) looks untrained when
    zero        max_d |T[v, d]| <= ZERO                     (1e-16: also the tiny denormals bf16 checkpoints carry)
    tiny        ||T[v]|| < TINY * median_u ||T[u]||          (100x below a typical row)
    duplicate   T[v] equals COPIES or more other rows bit for bit   (placeholder rows set from one vector; a single
                copy is spared: a new token started as a copy of a trained one is a trained row)
    near copy   cos(T[v], T[u]) >= NEAR for COPIES or more other rows u (checked for the tokens the data uses)
The near copies are what pretraining leaves in an untied head for tokens it never saw as targets: every step pushes
all of them down along the same direction (minus the mean hidden state), so they end up nearly parallel ("Fishing
for Magikarp", Land and Bartolo 2024, finds under-trained tokens from the unembedding the same way); trained rows of
distinct tokens are further apart (benchmarks/NOTES.md: 0.98 against at most 0.90). A random-init embedding row that
was never read looks like a trained one and cannot be told apart (the check says nothing about it).
The tables are read RANGE rows at a time (fp32 per chunk only), from the model in memory or from the checkpoint
files (`lorafuse data preview`, which loads no model). The near-copy check costs (tokens used) x V x D
multiply-adds: it always runs on a GPU; on a CPU above NEAR_BUDGET it is skipped, and the report says so.

Tokens checked: every id in the tokenized data (template text, special tokens, each row's tokens) plus EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ZERO = 1e-16
TINY = 0.01
COPIES = 2
NEAR = 0.95  # never-target head rows of a small pretrained Llama: 0.98 to each other; its trained rows: <= 0.90
NEAR_BUDGET = 2e11  # multiply-adds of the near-copy check allowed on a CPU (tens of seconds)
RANGE = 8192  # rows read at a time
SHOWN = 12  # tokens listed by name in the report


@dataclass
class TableCheck:
    """One table's verdict: which rows look untrained and why, and the mean of the trained rows (D,) fp32."""

    name: str  # "embedding" | "head"
    norms: Tensor  # (V,) fp32
    zero: Tensor  # (V,) bool
    duplicates: Tensor  # (V,) int: how many other rows equal this one bit for bit
    median: float
    mean: Tensor = field(default_factory=lambda: torch.zeros(0))
    std: Tensor = field(default_factory=lambda: torch.zeros(0))  # (D,) fp32: the trained rows' spread per dimension
    near: Tensor | None = None  # (V,) int: other rows with cosine >= NEAR (checked rows only); None: not checked

    @property
    def untrained(self) -> Tensor:
        near = self.near if self.near is not None else torch.zeros_like(self.duplicates)
        return self.zero | (self.norms < TINY * self.median) | (self.duplicates >= COPIES) | (near >= COPIES)

    def why(self, v: int) -> str | None:
        """Why row v looks untrained ("all zero", "norm 0.002x the median", "identical to 3 other rows"), or None."""
        if self.zero[v]:
            return f"{self.name} all zero"
        if self.norms[v] < TINY * self.median:
            return f"{self.name} norm {float(self.norms[v]) / self.median:.2g}x the median"
        if self.duplicates[v] >= COPIES:
            return f"{self.name} identical to {int(self.duplicates[v])} other rows"
        if self.near is not None and self.near[v] >= COPIES:
            return f"{self.name} nearly identical (cosine >= {NEAR}) to {int(self.near[v])} other rows"
        return None


def check_table(name: str, read: Callable[[int, int], Tensor], vocab: int, used: Tensor | None = None) -> TableCheck:
    """The verdict on a (vocab, D) table read through `read(start, end)` (rows start..end-1, any float dtype);
    near copies are looked for among the rows of `used` (ids, ascending) when given."""
    norms, zero, hashes, picked = [], [], [], []
    coeff, used = None, None if used is None else used[used < vocab]
    for start in range(0, vocab, RANGE):
        rows = read(start, min(start + RANGE, vocab))
        if coeff is None:
            coeff = torch.randint(-(2**62), 2**62, (rows.shape[1],), generator=torch.Generator().manual_seed(0))
        f = rows.float()
        norms.append(f.norm(dim=1).cpu())
        zero.append((f.abs().amax(dim=1) <= ZERO).cpu())
        hashes.append(_hash(rows, coeff.to(rows.device)).cpu())
        if used is not None:
            mine = used[(used >= start) & (used < start + rows.shape[0])] - start
            picked.append(f[mine.to(f.device)])
    norms, zero, h = torch.cat(norms), torch.cat(zero), torch.cat(hashes)
    _, inverse, counts = torch.unique(h, return_inverse=True, return_counts=True)
    duplicates = counts[inverse] - 1  # equal hashes: equal bits (64-bit hash; a collision would need ~2^32 rows)
    check = TableCheck(name, norms, zero, duplicates, float(norms.median()))
    q = torch.cat(picked) if used is not None else None
    if q is not None and q.device.type != "cuda" and q.numel() * vocab > NEAR_BUDGET:
        q = None  # too slow here: the run, on its GPU, checks
    check.mean, check.std, near = _second_pass(read, vocab, ~check.untrained, q)
    if near is not None:
        check.near = torch.zeros(vocab, dtype=torch.long)
        check.near[used] = near
    return check


def _hash(rows: Tensor, coeff: Tensor) -> Tensor:
    """A 64-bit hash of each row's bits: sum_d bits[v, d] * coeff[d] (mod 2^64, integer wrap-around)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    return (rows.contiguous().view(ints).to(torch.int64) * coeff).sum(dim=1)


def _second_pass(read, vocab: int, keep: Tensor, q: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(the mean and the standard deviation (population, per dimension) of the rows `keep` selects, (D,) fp32 each,
    and for each row of q (U, D) how many other rows of the table have cosine >= NEAR with it (U,), or None without
    q). The sums are kept in fp64 across the row ranges."""
    total, squares, n = None, None, int(keep.sum())
    unit = None if q is None else q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    near = None if q is None else torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)  # minus itself
    for start in range(0, vocab, RANGE):
        end = min(start + RANGE, vocab)
        rows = read(start, end).float()
        mine = rows[keep[start:end].to(rows.device)]
        part, part_sq = mine.sum(dim=0).double(), mine.square().sum(dim=0).double()
        total = part if total is None else total + part
        squares = part_sq if squares is None else squares + part_sq
        if unit is not None:
            other = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
            for u in range(0, unit.shape[0], 4096):  # (4096, RANGE) fp32 cosines at a time
                near[u : u + 4096] += (unit[u : u + 4096] @ other.t() >= NEAR).sum(dim=1)
    mean = total / max(n, 1)
    std = (squares / max(n, 1) - mean.square()).clamp_min(0).sqrt()
    return mean.float().cpu(), std.float().cpu(), None if near is None else near.clamp_min(0).cpu()


@dataclass
class TokenReport:
    """Which of the tokens the data uses look untrained (or are new), in which table, and what lorafuse does."""

    used: int  # distinct tokens the data uses
    ids: list[int]  # flagged ids, ascending
    reasons: dict[int, list[str]]
    names: dict[int, str]  # id -> the token as text
    tables: list[TableCheck] = field(default_factory=list)
    new: list[int] = field(default_factory=list)  # ids added to the vocabulary for this run


def used_token_ids(datasets, tokenizer) -> np.ndarray:
    """Every distinct id in the tokenized data sets (TokenizedDataset or None), plus EOS."""
    parts = [np.unique(ds.input_ids) for ds in datasets if ds is not None]
    extra = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return np.unique(np.concatenate(parts + [np.asarray(extra, dtype=np.int64)]).astype(np.int64))


def check_tokens(tables: list[TableCheck], used: np.ndarray, tokenizer, new_ids=()) -> TokenReport:
    """The report for the token ids `used`, given each table's verdict; `new_ids` are always listed (new rows)."""
    reasons: dict[int, list[str]] = {}
    for v in used.tolist():
        why = [w for t in tables if v < t.norms.numel() and (w := t.why(v))]
        if why:
            reasons[v] = why
    for v in new_ids:
        reasons[int(v)] = ["new token (added to the vocabulary)"]
    ids = sorted(reasons)
    names = {v: tokenizer.convert_ids_to_tokens(v) or tokenizer.decode([v]) for v in ids}
    return TokenReport(int(used.size), ids, reasons, names, tables, [int(v) for v in new_ids])


def report_lines(report: TokenReport, trains: bool, init: str = "sample", whole: list[str] = ()) -> list[str]:
    """The block the run and `lorafuse data preview` print; trains: lora.train_untrained_tokens is auto; init:
    lora.token_row_init; whole: the tables lora.modules_to_save trains whole ("embedding", "head")."""
    skipped = [t.name for t in report.tables if t.near is None]
    note = (
        [f"  near copies not checked in the {' and '.join(skipped)} here (too slow on a CPU); the run checks them"]
        if skipped
        else []
    )
    if not report.ids:
        return [f"untrained token rows: none among the {report.used} tokens the data uses"] + note
    old = [v for v in report.ids if v not in report.new]
    head = (
        f"untrained token rows: {len(old)} of the {report.used} tokens the data uses look untrained"
        + (f", plus {len(report.new)} new token{'s' if len(report.new) > 1 else ''}" if report.new else "")
        + ":"
    )
    lines = [head]
    for v in report.ids[:SHOWN]:
        lines.append(f"  {report.names[v]!r} (id {v}): {', '.join(report.reasons[v])}")
    if len(report.ids) > SHOWN:
        lines.append(f"  ... and {len(report.ids) - SHOWN} more")
    trained = f"lorafuse trains their embedding and output-head rows, {START[init]}"
    saved = "(saved in the adapter as peft's trainable_token_indices)" if not whole else "(saved in the adapter)"
    if trains:
        lines.append(f"  {trained} {saved}; lora.train_untrained_tokens=off leaves the existing ones as they are")
    else:
        kept = "new tokens are trained; " if report.new else ""
        lines.append(
            f"  lora.train_untrained_tokens=off: {kept}the existing rows are left as they are, so the model cannot "
            "learn to read or write those tokens (LoRA does not change table rows)"
        )
    if whole:
        lines.append(
            f"  the {' and the '.join(whole)} {'are' if len(whole) > 1 else 'is'} trained whole "
            "(lora.modules_to_save): those rows start there the same way and train with the rest of the table"
        )
    return lines + note


def table_checks(model, used: np.ndarray) -> list[TableCheck]:
    """The verdicts on a loaded model's input embedding and (untied) output head; near copies among `used`."""
    from lorafuse.lora.token_rows import tables

    emb, head, tied = tables(model)
    out = [_in_memory("embedding", emb.weight, used)]
    if head is not None and not tied:
        out.append(_in_memory("head", head.weight, used))
    return out


def _in_memory(name: str, weight: Tensor, used: np.ndarray) -> TableCheck:
    with torch.no_grad():
        return check_table(name, lambda a, b: weight[a:b].detach(), weight.shape[0], torch.from_numpy(used))


def give_rows(model, report: TokenReport, train_untrained: str, init: str = "sample", seed: int = 0) -> list[int]:
    """Attach trainable rows (lora/token_rows.py) for the flagged tokens (train_untrained "auto") or only the new
    ones ("off"). Each table's rows start at the table's own values, except rows it flags (and new rows), which
    start as `init` says (lora.token_row_init: "sample" draws the embedding's, on the CPU from `seed`, the same on
    every device, and starts an untied head's at its mean; "mean": both at the mean). A table trained whole
    (lora.modules_to_save) gets no rows: its flagged and new rows start the same way in the table itself, which
    trains them with the rest and saves them in the adapter. Returns the ids given rows."""
    from lorafuse.lora.token_rows import attach, state, tables

    if state(model) is not None:  # an adapter loaded to train on (load_adapter(..., is_trainable=True)) brought its own
        return state(model).ids
    ids = report.ids if train_untrained == "auto" else list(report.new)
    if not ids:
        return []
    emb, head, tied = tables(model)
    checks = {t.name: t for t in report.tables}
    index = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)

    def start_values(module, check, how):
        if module is None:
            return None
        w = module.weight.detach()
        values = w[index.to(w.device)].float()
        fresh = check.untrained[index] | torch.isin(index, torch.tensor(report.new, dtype=torch.long))
        values[fresh.to(values.device)] = fresh_rows(check, int(fresh.sum()), how, generator).to(values.device)
        if module.weight.requires_grad:  # trained whole: the rows start in the table, which trains them
            with torch.no_grad():
                module.weight[index.to(w.device)] = values.to(w.dtype)
            return None
        return values

    embed_values = start_values(emb, checks["embedding"], init)
    head_values = None if tied else start_values(head, checks.get("head"), "mean")
    if embed_values is None and head_values is None:
        return []
    attach(model, ids, embed_values, head_values)
    return ids


def _trained_tables(model) -> tuple:
    """(embedding, untied head), each the module when lora.modules_to_save trains it whole, else None."""
    from lorafuse.lora.token_rows import tables

    emb, head, tied = tables(model)
    pick = lambda m: m if m is not None and m.weight.requires_grad else None  # noqa: E731
    return pick(emb), None if tied else pick(head)


def fresh_rows(check: TableCheck, count: int, init: str, generator: torch.Generator) -> Tensor:
    """(count, D) fp32 starting rows for a table's flagged or new tokens (`give_rows`, lora.token_row_init):
    "sample": mean + std * N(0, 1) per dimension, drawn from `generator`; "mean": the trained rows' mean."""
    if init == "mean":
        return check.mean.expand(count, -1).clone()
    if init != "sample":
        raise ValueError(f"token row init {init!r}: one of {tuple(START)}")
    return check.mean + check.std * torch.randn(count, check.mean.numel(), generator=generator)


START = {  # lora.token_row_init -> how the report says it
    "sample": "the embedding rows each drawn around the trained rows (their mean and spread), the head rows at "
    "their mean",
    "mean": "started at the mean of the trained rows",
}


def rows_for_run(model, tokenizer, datasets, new_ids, lora_cfg, console, say: bool = True, seed: int = 0) -> list[int]:
    """The run's check and rows: report which tokens the data uses look untrained and train them (see
    `give_rows`; lora_cfg: the config's lora section). Returns the ids given rows."""
    from lorafuse.lora.token_rows import VALUES_KEY

    train_untrained, init = lora_cfg.train_untrained_tokens, lora_cfg.token_row_init
    used = used_token_ids(datasets, tokenizer)
    report = check_tokens(table_checks(model, used), used, tokenizer, new_ids)
    ids = give_rows(model, report, train_untrained, init, seed)
    if say:
        whole = [name for name, module in zip(("embedding", "head"), _trained_tables(model)) if module is not None]
        lines = report_lines(report, train_untrained == "auto", init, whole)
        rows = [p for n, p in model.named_parameters() if n.endswith(VALUES_KEY)]
        if rows:  # the trainable-parameters line apply_lora printed did not count them
            lines.append(f"  trainable token rows: {sum(p.numel() for p in rows):,d} parameters more")
        for line in lines:
            console.print(line, highlight=False, markup=False)
    return ids


def folder_checks(path: str, used: np.ndarray, trust_remote_code: bool = False) -> tuple[list[TableCheck], str, dict]:
    """The verdicts on the tables of a checkpoint folder, read from its safetensors files in RANGE-row slices (no
    model is loaded), near copies among `used`, and the tables' module names ({"embedding": ..., "head": ...});
    ([], why, {}) when they cannot be read that way."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafuse.errors import LorafuseError
    from lorafuse.lora.token_rows import module_name, tables
    from lorafuse.model.load import resolve_model_path

    try:
        folder = Path(resolve_model_path(path))
    except LorafuseError as exc:
        return [], exc.problem, {}
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return [], "the model's weights are not safetensors files in a local folder; the run checks them", {}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    emb, head, tied = tables(skeleton)
    wanted = [("embedding", module_name(skeleton, emb))]
    if head is not None and not tied:
        wanted.append(("head", module_name(skeleton, head)))
    keys = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    checks = []
    for what, name in wanted:
        key = next((k for k in (f"{name}.weight", *keys) if k in keys and k.endswith(f"{name}.weight")), None)
        if key is None:
            return [], f"the checkpoint has no tensor named {name}.weight; the run checks the loaded model", {}
        with safe_open(str(keys[key]), "pt") as f:
            part = f.get_slice(key)
            read = lambda a, b, part=part: part[a:b]  # noqa: E731
            checks.append(check_table(what, read, part.get_shape()[0], torch.from_numpy(used)))
    return checks, "", dict(wanted)


def preview_lines(model_cfg, tokenizer, datasets, new_ids, lora_cfg) -> list[str]:
    """`lorafuse data preview`'s block: the run's check, on the checkpoint's tables read from disk (lora_cfg: the
    config's lora section)."""
    used = used_token_ids(datasets, tokenizer)
    checks, why, names = folder_checks(model_cfg.path, used, model_cfg.trust_remote_code)
    if not checks:
        return [f"untrained token rows: not checked before training ({why})"]
    report = check_tokens(checks, used, tokenizer, new_ids)
    saved = lora_cfg.modules_to_save or []
    whole = [what for what, name in names.items() if any(name.endswith(m) for m in saved)]  # peft's rule
    return report_lines(report, lora_cfg.train_untrained_tokens == "auto", lora_cfg.token_row_init, whole)

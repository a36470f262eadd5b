"""Out of GPU memory inside a training step: what to do about it, as a decision the loop applies.

When a forward/backward of step s raises an out-of-memory error (`torch.cuda.OutOfMemoryError`, or a RuntimeError
whose message contains "out of memory": cuBLAS/cuDNN workspace failures, MPS), the loop (lorafuse.training.loop,
`TrainingLoop.step`):

  1. drops the partial step (`release`): the exception (whose traceback holds the activations) is already released,
     the gradients the window accumulated so far are cleared, unreachable graphs are collected, and on CUDA the
     caching allocator's free blocks go back to the driver (torch.cuda.empty_cache);
  2. asks `decide(setting, error, step, epoch, config)` for the next smaller setting: `lorafuse.plan.next_smaller(cfg)`
     on the run's config with the changes so far: gradient checkpointing on, or micro_batch_size b -> b', its largest
     proper divisor, with grad_accum x b/b' (the effective batch is unchanged). Without a config the planner can size
     (the bare loop, an unknown shape offline), the same rule: a divisor of the micro-batch, else checkpointing. The
     `Decision` carries the change, the line to print and the metrics row, or the error when nothing smaller can
     apply mid-run (micro-batch 1 with checkpointing on: a shorter max_length would change the data);
  3. applies it (the overrides, checkpointing turned on through lorafuse.accel) and retries the step ONCE, from its
     first micro-batch, with the RNG state it started with. Every micro-batch of the window is re-split
     (`split_batch`) into consecutive pieces of b' rows (b' pairs for preference batches: the chosen and the rejected
     rows of a pair stay together), each trimmed to its longest row as the Batcher pads. The step covers the same
     rows in the same order and divides by the same unit count, so its loss and gradient are the same math; the
     pieces are even the very micro-batches a Batcher with micro_batch_size b' yields (consecutive chunks of the same
     permutation), so from here on the run computes what a run started at b' computes. Nothing is skipped or
     reordered;
  4. an OOM during the retry stops the run with `retry_failed`: a LorafuseError naming both settings and pointing at
     `lorafuse plan`.

The change is printed and logged as a metrics row {"step", "epoch", "event": "oom_retry", "micro_batch_size",
"grad_accum", "gradient_checkpointing", "from": {the setting that failed}, "error"} and kept for the rest of the
run; a later step that runs out again gets its own single retry, one notch further down.

The loop's bookkeeping stays in the Batcher's units (data position, micro-batches per epoch, a window of
train.grad_accum Batcher micro-batches), so checkpoints need only the changes themselves: `LoopState.oom_overrides`,
saved in trainer_state.json. A resumed run re-applies them before its first step instead of running out of memory
again to rediscover them. config.yaml keeps the setting the run started with (after train.auto_fit), so the resume
config check compares the user's config with what they asked for.

Always on, with or without train.auto_fit: the errors it matches come from CUDA (and MPS); a CPU allocation failure
says something else and propagates. The alternative is a crash that loses the step and everything since the last
checkpoint; until an OOM happens the cost is one RNG-state snapshot per step. Under torchrun each rank shrinks on its
own (the unit count is global, so the math agrees whatever the ranks' micro-batches); a rank that stops raises while
the others wait in the gradient all-reduce until the launcher ends the job.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafuse.data.collate import packed_fields
from lorafuse.errors import LorafuseError
from lorafuse.plan import apply_overrides, next_smaller
from lorafuse.training import graphs

MB, GA, CK = "train.micro_batch_size", "train.grad_accum", "train.gradient_checkpointing"


@dataclass(frozen=True)
class Decision:
    """What to do after an out-of-memory error in a step: retry at `setting` (with `change` added to the run's
    overrides, `note` printed and `row` logged), or stop with `error`."""

    before: dict  # the setting that ran out of memory
    change: dict | None = None
    setting: dict | None = None
    note: str = ""
    row: dict | None = None
    error: LorafuseError | None = None


def is_oom(exc: BaseException) -> bool:
    """True for CUDA's out-of-memory error and RuntimeErrors that say "out of memory"."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


def first_line(exc: BaseException) -> str:
    """The error's first line (at most 300 characters), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def current_setting(tc, overrides: dict) -> dict:
    """The micro-batch setting in force: the TrainConfig's, with the changes made after OOMs."""
    base = {MB: tc.micro_batch_size, GA: tc.grad_accum, CK: bool(tc.gradient_checkpointing)}
    return {**base, **overrides}


def describe(setting: dict) -> str:
    return (
        f"micro_batch_size {setting[MB]} x grad_accum {setting[GA]}, gradient checkpointing "
        f"{'on' if setting[CK] else 'off'}"
    )


def decide(setting: dict, error: str, step: int, epoch: float, config=None) -> Decision:
    """The Decision after an out-of-memory error (`error`: its first line) in optimizer step `step` (1-based)."""
    change = _next_setting(setting, config)
    if change is None:
        problem = (
            f"out of GPU memory in step {step} at {describe(setting)}, and there is no smaller setting "
            "to retry with mid-run (a shorter data.max_length would change the data)"
        )
        return Decision(before=setting, error=_error(problem, error, config))
    now = {**setting, **change}
    row = {"step": step, "epoch": epoch, "event": "oom_retry", **_short(now), "from": _short(setting), "error": error}
    note = (
        f"step {step}: out of GPU memory at {describe(setting)}; retrying the step at {describe(now)} "
        f"(effective batch {now[MB] * now[GA]})"
    )
    return Decision(before=setting, change=change, setting=now, note=note, row=row)


def retry(loop, batches: list[dict], units: int, rng: tuple, error: str) -> torch.Tensor:
    """Steps 1-4 above for `loop` (a TrainingLoop) whose window `batches` ran out of memory with `error` (its first
    line); `rng`: the RNG state the step started with. Returns the retried window's sums."""
    st, tc = loop.state, loop.tc
    loop._finish_pending()  # the previous step's row before the retry's, as the log of any run has them
    release(loop.optimizer, loop.graphed is None, loop.device)
    decision = decide(loop.setting(), error, st.step + 1, loop._epoch_float(), loop.config)
    if decision.error is not None:
        raise decision.error
    st.oom_overrides = {**st.oom_overrides, **decision.change}  # kept for the run and its checkpoints
    loop.metrics.append(decision.row)
    loop.note(decision.note)
    loop._match_setting()
    set_rng_state(rng, loop.device)  # the retry draws the dropout masks the step would have drawn
    graphs.seed_dropout(loop.model, tc.seed, loop.world.rank, tc.grad_accum, st.step)
    sums, error = loop._micro_steps(batches, units)
    if error is not None:
        release(loop.optimizer, loop.graphed is None, loop.device)
        raise retry_failed(decision, error, st.step + 1, loop.config)
    return sums


def retry_failed(decision: Decision, error: str, step: int, config=None) -> LorafuseError:
    """The error that stops the run when the retry at `decision.setting` ran out of memory too."""
    problem = (
        f"out of GPU memory in step {step} at {describe(decision.before)}, and again on the retry at "
        f"{describe(decision.setting)}"
    )
    return _error(problem, error, config)


def release(optimizer, set_to_none: bool, device: torch.device) -> None:
    """Drop a failed attempt's partial gradient sum and give the freed memory back (CUDA's cached blocks)."""
    optimizer.zero_grad(set_to_none=set_to_none)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rng_state(device: torch.device) -> tuple:
    """What a forward draws from: torch's CPU generator (dropout seeds) and this device's (dropout masks)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ------------------------------------------------------------------------------------------ re-splitting a batch


def split_batch(batch: dict, rows: int, multiple: int = 1) -> list[dict]:
    """Consecutive pieces of at most `rows` rows, each cut to its longest row (rounded up to `multiple`).

    A preference batch (it has "num_pairs" B: rows 0..B-1 chosen, B..2B-1 rejected) is split into pieces of at most
    `rows` pairs: piece [k, k') holds rows k..k'-1 and B+k..B+k'-1, with its pairs' data set rows and reference
    log-probs.
    """
    pairs = batch.get("num_pairs")
    n = pairs if pairs is not None else batch["input_ids"].shape[0]
    if n <= rows:
        return [batch]
    return [_piece(batch, lo, min(lo + rows, n), multiple) for lo in range(0, n, rows)]


def _take(value, lo: int, hi: int, pairs: int | None):
    """Rows [lo, hi) of a tensor or list; with `pairs` B, rows [lo, hi) and [B + lo, B + hi)."""
    if pairs is None:
        return value[lo:hi]
    if torch.is_tensor(value):
        return torch.cat([value[lo:hi], value[pairs + lo : pairs + hi]])
    return value[lo:hi] + value[pairs + lo : pairs + hi]


def _piece(batch: dict, lo: int, hi: int, multiple: int) -> dict:
    n, full = batch["input_ids"].shape
    pairs = batch.get("num_pairs")
    lens = _take(batch["seq_lens"], lo, hi, pairs) if "seq_lens" in batch else None
    mask = batch.get("attention_mask")
    if lens is not None:  # packed (or padded) rows start with their real tokens
        longest = max(sum(row) for row in lens)
    elif mask is not None and mask.dim() == 2:  # the last column any row of the piece attends to
        longest = int(_take(mask, lo, hi, pairs).any(0).nonzero().max()) + 1
    else:
        longest = full
    width = min(full, -(-longest // multiple) * multiple)
    skip = ("seq_lens", "rows", "ref_logps")
    out = {k: v for k, v in batch.items() if not (torch.is_tensor(v) or k.startswith("num_") or k in skip)}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == n:
            out[key] = _take(value, lo, hi, pairs)[:, :width]
    labels = out["labels"]
    if lens is not None:
        out["seq_lens"] = lens
    if "cu_seqlens" in batch:  # the varlen layout of the trimmed rows, as the Batcher builds it
        out.update(packed_fields(lens, width))
    if "num_target_tokens" in batch:
        out["num_target_tokens"] = int((labels[:, 1:] != -100).sum())
    if "num_tokens" in batch:
        out["num_tokens"] = sum(map(sum, lens)) if lens is not None else int(out["attention_mask"].sum())
    if "num_sequences" in batch:
        out["num_sequences"] = sum(map(len, lens)) if lens is not None else labels.shape[0]
    if pairs is not None:
        out["num_pairs"] = hi - lo
        out.update({k: _take(batch[k], lo, hi, pairs) for k in ("rows", "ref_logps") if k in batch})
    return out


# ------------------------------------------------------------------------------------------ the next setting


def _short(setting: dict) -> dict:
    return {"micro_batch_size": setting[MB], "grad_accum": setting[GA], "gradient_checkpointing": setting[CK]}


def _divisor_rule(setting: dict) -> dict | None:
    """The planner's move without the planner: the largest proper divisor of the micro-batch, else checkpointing."""
    mb = setting[MB]
    smaller = [d for d in range(mb - 1, 0, -1) if mb % d == 0]
    if smaller:
        return {MB: smaller[0], GA: setting[GA] * (mb // smaller[0])}
    return None if setting[CK] else {CK: True}


def _next_setting(setting: dict, config) -> dict | None:
    """Overrides one notch smaller that can apply mid-step (a re-split or checkpointing), or None."""
    change = _divisor_rule(setting)  # without a config, or a shape the planner cannot read (hub id offline)
    if config is not None:
        try:
            change = next_smaller(apply_overrides(config, setting))
        except LorafuseError:
            pass
    if not change or set(change) - {MB, GA, CK}:
        return None  # the floor, or only a shorter max_length left
    return change


def _error(problem: str, error: str, config=None) -> LorafuseError:
    # the run folder's config.yaml is the run's resolved config: the command runs as printed
    plan = f"`lorafuse plan {Path(config.output.dir) / 'config.yaml'}`" if config is not None else "`lorafuse plan`"
    return LorafuseError(
        f"{problem}. The error: {error}",
        f"run {plan} to see where the memory goes and the fastest setting that fits this GPU, "
        "and train with it (train.auto_fit=true applies it for you); or lower data.max_length, use "
        "model.quant=nf4, or use a GPU with more memory",
    )

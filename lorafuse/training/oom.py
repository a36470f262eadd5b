"""Out-of-memory recovery inside a training step: drop the partial step, shrink the setting one notch, retry once.

When a forward/backward of step s raises an out-of-memory error (`torch.cuda.OutOfMemoryError`, or a
RuntimeError whose message contains "out of memory": cuBLAS/cuDNN workspace failures, MPS):

  1. the partial step is dropped: the exception (whose traceback holds the activations) is released, the
     gradients the window accumulated so far are set to None, unreachable graphs are collected, and on CUDA the
     caching allocator's free blocks go back to the driver (torch.cuda.empty_cache);
  2. the next smaller setting comes from the planner: `lorafuse.plan.next_smaller(cfg)` on the run's config
     with the changes so far: gradient checkpointing on, or micro_batch_size b -> b', its largest proper
     divisor, with grad_accum x b/b' (the effective batch is unchanged). Without a config the planner can size
     (the bare loop, an unknown shape offline), the same rule: a divisor of the micro-batch, else checkpointing;
  3. the step is retried ONCE, from its first micro-batch, with the RNG state it started with. Every
     micro-batch of the window is re-split into consecutive pieces of b' rows, each trimmed to its longest row
     as the Batcher pads. The step covers the same rows in the same order and divides by the same target
     count N_s, so loss_s and its gradient are the same math; the pieces are even the very micro-batches a
     Batcher with micro_batch_size b' yields (consecutive chunks of the same permutation), so from here on the
     run computes what a run started at b' computes. Nothing is skipped or reordered;
  4. an OOM during the retry stops the run with a LorafuseError naming both settings and pointing at
     `lorafuse plan`; so does the first OOM when nothing smaller can apply mid-run (micro-batch 1 with
     checkpointing on: a shorter max_length would change the data).

The change is printed and logged as a metrics row {"step", "epoch", "event": "oom_retry", "micro_batch_size",
"grad_accum", "gradient_checkpointing", "from": {the setting that failed}, "error"} and kept for the rest of
the run; a later step that runs out again gets its own single retry, one notch further down.

The loop's bookkeeping stays in the Batcher's units (data position, micro-batches per epoch, a window of
train.grad_accum Batcher micro-batches), so checkpoints need only the changes themselves:
`LoopState.oom_overrides`, saved in trainer_state.json. A resumed run re-applies them before its first step
instead of running out of memory again to rediscover them. config.yaml keeps the setting the run started with
(after train.auto_fit), so the resume config check compares the user's config with what they asked for.

Always on, with or without train.auto_fit: the errors it matches come from CUDA (and MPS); a CPU allocation
failure says something else and propagates. The alternative is a crash that loses the step and everything
since the last checkpoint; until an OOM happens the cost is one RNG-state snapshot per step. Under torchrun
each rank shrinks on its own (N_s is global, so the math agrees whatever the ranks' micro-batches); a rank that
stops raises while the others wait in the gradient all-reduce until the launcher ends the job.
"""

from __future__ import annotations

import gc

import torch

from lorafuse.errors import LorafuseError
from lorafuse.training.graphs import seed_dropout

MB, GA, CK = "train.micro_batch_size", "train.grad_accum", "train.gradient_checkpointing"


def is_oom(exc: BaseException) -> bool:
    """True for CUDA's out-of-memory error and RuntimeErrors that say "out of memory"."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


def split_batch(batch: dict, rows: int, multiple: int = 1) -> list[dict]:
    """Consecutive pieces of at most `rows` rows, each cut to its longest row (rounded up to `multiple`)."""
    n = batch["input_ids"].shape[0]
    if n <= rows:
        return [batch]
    return [_piece(batch, lo, min(lo + rows, n), multiple) for lo in range(0, n, rows)]


def _piece(batch: dict, lo: int, hi: int, multiple: int) -> dict:
    n, full = batch["input_ids"].shape
    lens = batch["seq_lens"][lo:hi] if "seq_lens" in batch else None
    mask = batch.get("attention_mask")
    if lens is not None:  # packed (or padded) rows start with their real tokens
        longest = max(sum(row) for row in lens)
    elif mask is not None and mask.dim() == 2:  # the last column any row of the piece attends to
        longest = int(mask[lo:hi].any(0).nonzero().max()) + 1
    else:
        longest = full
    width = min(full, -(-longest // multiple) * multiple)
    out = {k: v for k, v in batch.items() if not (torch.is_tensor(v) or k.startswith("num_") or k == "seq_lens")}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == n:
            out[key] = value[lo:hi, :width]
    labels = out["labels"]
    if lens is not None:
        out["seq_lens"] = lens
    if "cu_seqlens" in batch:  # the varlen layout of the trimmed rows, as the Batcher builds it
        from lorafuse.data.collate import _packed_fields

        out.update(_packed_fields(lens, width))
    if "num_target_tokens" in batch:
        out["num_target_tokens"] = int((labels[:, 1:] != -100).sum())
    if "num_tokens" in batch:
        out["num_tokens"] = sum(map(sum, lens)) if lens is not None else int(out["attention_mask"].sum())
    if "num_sequences" in batch:
        out["num_sequences"] = sum(map(len, lens)) if lens is not None else hi - lo
    return out


def _rng_state(device: torch.device) -> tuple:
    """What a forward draws from: torch's CPU generator (dropout seeds) and this device's (dropout masks)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _short(setting: dict) -> dict:
    return {"micro_batch_size": setting[MB], "grad_accum": setting[GA], "gradient_checkpointing": setting[CK]}


def _describe(setting: dict) -> str:
    return (
        f"micro_batch_size {setting[MB]} x grad_accum {setting[GA]}, gradient checkpointing "
        f"{'on' if setting[CK] else 'off'}"
    )


def _divisor_rule(setting: dict) -> dict | None:
    """The planner's move without the planner: the largest proper divisor of the micro-batch, else checkpointing."""
    mb = setting[MB]
    smaller = [d for d in range(mb - 1, 0, -1) if mb % d == 0]
    if smaller:
        return {MB: smaller[0], GA: setting[GA] * (mb // smaller[0])}
    return None if setting[CK] else {CK: True}


class OomRetry:
    """One window's forward/backward with the recovery above; `loop` is the TrainingLoop it serves."""

    def __init__(self, loop):
        self.loop = loop
        self._checkpointing_applied = False
        self._started = False

    def setting(self) -> dict:
        """The micro-batch setting in force: the config's, with the changes made after OOMs."""
        tc = self.loop.tc
        base = {MB: tc.micro_batch_size, GA: tc.grad_accum, CK: bool(tc.gradient_checkpointing)}
        return {**base, **self.loop.state.oom_overrides}

    def accumulate(self, batches: list[dict], n_target: int) -> torch.Tensor:
        """The window's summed loss, forward and backward done (gradients accumulated in .grad)."""
        if not self._started:
            self._started = True
            if self.loop.state.oom_overrides:  # resumed: say why the setting is not the config's
                self.loop._note(
                    f"continuing at {_describe(self.setting())} (lowered after an out-of-memory "
                    "error earlier in this run)"
                )
        self._apply()
        rng, before = _rng_state(self.loop.device), self.setting()
        total, error = self._attempt(batches, n_target)
        if error is None:
            return total
        self._release()
        change = self._next_setting(before)
        if change is None:
            raise self._error([before], error)
        self._shrink(change, before, error)
        _set_rng_state(rng, self.loop.device)  # the retry draws the dropout masks the step would have drawn
        seed_dropout(self.loop)  # the fast path's too (its seed base advanced in the failed attempt)
        total, error = self._attempt(batches, n_target)
        if error is None:
            return total
        self._release()
        raise self._error([before, self.setting()], error)

    def _attempt(self, batches: list[dict], n_target: int):
        """(total, None), or (None, the error's first line) after an OOM; the exception is released on return."""
        rows, multiple = self.setting()[MB], getattr(self.loop.train_batches, "pad_to_multiple_of", 1)
        pieces = [p for b in batches for p in split_batch(b, rows, multiple)]
        try:
            return self.loop._micro_steps(pieces, n_target), None
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            text = str(exc).strip()
            return None, (text.splitlines()[0][:300] if text else type(exc).__name__)

    def _release(self) -> None:
        self.loop.optimizer.zero_grad(set_to_none=self.loop.graphed is None)  # the failed attempt's partial sum
        gc.collect()
        if self.loop.device.type == "cuda":
            torch.cuda.empty_cache()

    def _next_setting(self, setting: dict) -> dict | None:
        """Overrides one notch smaller that can apply mid-step (a re-split or checkpointing), or None."""
        from lorafuse.plan import apply_overrides, next_smaller

        change = _divisor_rule(setting)  # without a config, or a shape the planner cannot read (hub id offline)
        if self.loop.config is not None:
            try:
                change = next_smaller(apply_overrides(self.loop.config, setting))
            except LorafuseError:
                pass
        if not change or set(change) - {MB, GA, CK}:
            return None  # the floor, or only a shorter max_length left
        return change

    def _shrink(self, change: dict, before: dict, error: str) -> None:
        loop = self.loop
        loop.state.oom_overrides = {**loop.state.oom_overrides, **change}
        self._apply()
        now, step = self.setting(), loop.state.step + 1
        loop.metrics.append(
            {
                "step": step,
                "epoch": loop._epoch_float(),
                "event": "oom_retry",
                **_short(now),
                "from": _short(before),
                "error": error,
            }
        )
        loop._note(
            f"step {step}: out of GPU memory at {_describe(before)}; retrying the step at {_describe(now)} "
            f"(effective batch {now[MB] * now[GA]})"
        )

    def _apply(self) -> None:
        """Make the model match the setting: checkpointing turned on after an OOM (here or before a resume)."""
        if self.setting()[CK] and not self.loop.tc.gradient_checkpointing and not self._checkpointing_applied:
            from lorafuse.training.runtime import prepare_model

            prepare_model(self.loop.model, True, note=self.loop._note)
            self._checkpointing_applied = True

    def _error(self, tried: list[dict], error: str) -> LorafuseError:
        step = self.loop.state.step + 1
        if len(tried) == 1:
            problem = (
                f"out of GPU memory in step {step} at {_describe(tried[0])}, and there is no smaller setting "
                "to retry with mid-run (a shorter data.max_length would change the data)"
            )
        else:
            problem = (
                f"out of GPU memory in step {step} at {_describe(tried[0])}, and again on the retry at "
                f"{_describe(tried[1])}"
            )
        return LorafuseError(
            f"{problem}. The error: {error}",
            "run `lorafuse plan CONFIG` to see where the memory goes and the fastest setting that fits this GPU, "
            "and train with it (train.auto_fit=true applies it for you); or lower data.max_length, use "
            "model.quant=nf4, or use a GPU with more memory",
        )

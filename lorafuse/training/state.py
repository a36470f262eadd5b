"""The training loop's counters and result: what a resume restores besides tensors, and what a run returns.

`LoopState` is saved as trainer_state.json in every checkpoint (with the total steps, the data's sha256, the LR
schedule, the log window and the world size); `LoopResult` is what `TrainingLoop.run` returns to the job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lorafuse.errors import LorafuseError


@dataclass
class LoopState:
    """Everything a resume needs besides tensors (saved as trainer_state.json)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: epoch ...
    micro_index: int = 0  # ... and micro-batches of it consumed
    tokens: int = 0  # non-pad input tokens processed
    target_tokens: int = 0
    best_eval: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    nan_streak: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    micro_per_epoch: int = 0
    oom_overrides: dict = field(default_factory=dict)  # setting lowered after OOMs (lorafuse.training.oom)


@dataclass
class LoopResult:
    state: LoopState
    stop_reason: str  # finished | early_stopping | signal | already_complete
    total_steps: int
    first_loss: float | None = None
    last_loss: float | None = None
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    rows: list = field(default_factory=list)
    stop_signal: str | None = None  # "SIGINT" | "SIGTERM" when stop_reason is "signal"
    speedups: dict = field(default_factory=dict)  # what ran: fast_path, fused_loss (bools), cuda_graph_replays


def total_steps(tc, micro_per_epoch: int) -> int:
    """max_steps when set, else ceil(epochs * steps per epoch); an epoch has ceil(micro / grad_accum) steps."""
    if tc.max_steps:
        return int(tc.max_steps)
    return max(1, math.ceil(tc.epochs * math.ceil(micro_per_epoch / tc.grad_accum)))


def nan_error(state: LoopState, tolerance: int, last_good: Path | None = None, set_aside: str = "") -> LorafuseError:
    first = state.step - state.nan_streak + 1
    resume = (
        f"Then run the same command with --force: it resumes from {last_good.name}, the last checkpoint before "
        "the NaN steps"
        if last_good is not None
        else "Then run the same command again"
    )
    return LorafuseError(
        f"the loss was NaN/inf for {state.nan_streak} optimizer steps in a row (steps {first}-{state.step}); "
        f"the run stopped without saving the weights that gave it (train.nan_tolerance={tolerance}){set_aside}",
        "likely causes: (1) the learning rate is too high: lower train.lr (e.g. 10x) or raise "
        "train.warmup_steps; (2) float16 overflow: use model.compute_dtype=bfloat16 on a GPU that supports it "
        "(Ampere or newer) or float32; (3) bad data rows (empty or very long responses, broken labels): "
        f"inspect them with `lorafuse data preview`. {resume}",
    )


def diverged(state: LoopState, tolerance: int, out_dir: Path | None) -> LorafuseError:
    """The error that stops a run after too many NaN steps, or one that ended in NaN steps. The checkpoints written
    from the weights that gave them (the one just before the streak, any during it) are set aside in `out_dir` (None:
    a rank that writes no files), so the resume the error advises starts from weights that worked."""
    from lorafuse.training import checkpoint as ckpt

    first = state.step - state.nan_streak + 1
    moved, last_good = None, None
    if out_dir is not None:
        moved = ckpt.archive_newer(out_dir, first - 2)  # checkpoint-(first-1) holds the weights step `first` used
        last_good = ckpt.latest_checkpoint(out_dir)
    names = ", ".join(sorted(p.name for p in moved.iterdir())) if moved else ""
    aside = f"; {names} (from the weights that gave the first NaN loss) moved to {moved}" if moved else ""
    return nan_error(state, tolerance, last_good, aside)

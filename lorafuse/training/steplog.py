"""What the loop logs about its steps: the running window between two logged rows, and the rows themselves.

A logged row (metrics.jsonl, the progress line, the trackers) covers the optimizer steps since the previous one:

    loss = sum_steps loss_s * U_s / sum_steps U_s          U_s = the step's units (target tokens for SFT, pairs for
    metric = sum_steps metric_s * U_s / sum_steps U_s            DPO/ORPO); skipped steps add their input tokens only

so a row's loss is the mean per unit over its steps, whatever `train.log_every`. The window's sums are saved in every
checkpoint (trainer_state.json "log_window": a logged row may span a save), so a resumed run logs the rows an
uninterrupted run logs. A row's tokens_per_s runs from the end of the previous logged step to the end of its own, as
the device finished them (the loop reads a step's numbers one step late: lorafuse.training.loop).
"""

from __future__ import annotations

import math
import time


class LogWindow:
    """Sums since the last logged row: loss and metrics weighted by units, units, input tokens, wall time."""

    def __init__(self, metric_names: tuple[str, ...] = ()):
        self.metric_names = metric_names
        self.reset()

    def reset(self, now: float | None = None) -> None:
        """Empty sums; the window's time starts at `now` (time.perf_counter() seconds; None: at once)."""
        self.loss_sum, self.units, self.inputs = 0.0, 0, 0
        self.metric_sums = dict.fromkeys(self.metric_names, 0.0)
        self.t0 = time.perf_counter() if now is None else now

    def add(self, row: dict) -> None:
        """One step's row (`StepRecord.row`: "loss", "units", "n_input", "skipped", and each metric)."""
        self.inputs += row["n_input"]
        if row["skipped"]:
            return
        self.loss_sum += row["loss"] * row["units"]
        self.units += row["units"]
        for name in self.metric_names:
            self.metric_sums[name] += row[name] * row["units"]

    def means(self) -> dict:
        """{"loss": ..., <metric>: ...}: means per unit over the window (call only when `units` > 0)."""
        return {"loss": self.loss_sum / self.units} | {n: s / self.units for n, s in self.metric_sums.items()}

    def tokens_per_s(self, now: float | None = None) -> float:
        """Input tokens per second from the window's start to `now` (None: at once)."""
        return round(self.inputs / max((time.perf_counter() if now is None else now) - self.t0, 1e-9), 1)

    def state_dict(self) -> dict:
        """The sums for trainer_state.json ("targets" holds the units: the key of the SFT-only format)."""
        saved = {"loss_sum": self.loss_sum, "targets": self.units, "inputs": self.inputs}
        return saved | ({"metrics": dict(self.metric_sums)} if self.metric_names else {})

    def load_state_dict(self, saved: dict) -> None:
        self.loss_sum = saved.get("loss_sum", 0.0)
        self.units = saved.get("targets", 0)
        self.inputs = saved.get("inputs", 0)
        self.metric_sums.update({k: v for k, v in saved.get("metrics", {}).items() if k in self.metric_sums})


def log_step(loop, record, row: dict, end: float, eta: float) -> None:
    """Add a step's row (`record`: its lorafuse.training.update.StepRecord, `end`: when the device finished it) to the
    loop's window; log a skipped step, and the window's row at every train.log_every-th step and the last (metrics,
    trackers, the progress line)."""
    window = loop.window
    window.add(row)
    if row["skipped"]:
        loop.metrics.append(skipped_row(record.step, record.epoch, row))
        loop.note(skipped_note(record.step, row["skipped"]))
    if not (record.last or record.step % loop.tc.log_every == 0) or not window.units:
        return
    out = {
        "step": record.step,
        "epoch": record.epoch,
        **window.means(),
        "lr": row["lr"],
        "grad_norm": row["grad_norm"],
        "tokens": record.tokens,
        "tokens_per_s": window.tokens_per_s(end),
        "memory_mb": record.memory_mb,
        "time_s": round(loop.state.train_seconds, 3),
    }
    loop.metrics.append(out)
    loop.progress.update(record.step, out, eta_s=eta)
    window.reset(end)


def skipped_row(step: int, epoch: float, row: dict) -> dict:
    """The metrics row of a step skipped on a NaN/inf loss or an fp16 overflow."""
    return {
        "step": step,
        "epoch": epoch,
        "loss": None,
        "lr": row["lr"],
        "grad_norm": row["grad_norm"],
        "skipped": True,
        "reason": row["skipped"],
    }


def skipped_note(step: int, reason: str) -> str:
    why = "NaN/inf loss" if reason == "nan" else "fp16 overflow (loss scale lowered)"
    return f"step {step}: skipped ({why})"


def eval_row(step: int, epoch: float, out: dict, objective) -> dict:
    """The metrics row of an evaluation (`out`: lorafuse.training.objectives.evaluate's): eval_loss, and for SFT the
    perplexity, for a preference objective each metric as eval_<name>."""
    loss = out["loss"]
    if objective.name == "sft":
        extra = {"eval_ppl": _exp(loss)}
    else:
        extra = {f"eval_{n}": out[n] for n in objective.metric_names}
    return {"step": step, "epoch": epoch, "eval_loss": loss, **extra}


def eval_note(row: dict) -> str:
    if "eval_ppl" in row:
        return f"step {row['step']}: eval_loss {row['eval_loss']:.4f} | eval_ppl {row['eval_ppl']:.2f}"
    shown = ("eval_loss", "eval_rewards/margin", "eval_rewards/accuracy")
    return f"step {row['step']}: " + " | ".join(f"{k} {row[k]:.4f}" for k in shown if k in row)


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf

"""Metrics: the JSONL log, the loss plot, the progress display, memory readings and the final summary.

`metrics.jsonl` holds one JSON object per logged optimizer step:
    {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "memory_mb", "time_s"}
(+ "skipped": true, loss null, for a step skipped on a NaN/inf loss), and one per evaluation:
    {"step", "epoch", "eval_loss", "eval_ppl"}.
A preference objective (DPO, ORPO) adds its metrics, means per pair, after "loss": "rewards/chosen",
"rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected" (ORPO: also
"log_odds_ratio", "log_odds_chosen", "nll"); its evaluation rows carry them as "eval_<name>" instead of eval_ppl.
Non-finite floats are written as null (JSON has no NaN). The file is appended and flushed as rows come; a
checkpoint stores a copy, and a resume rewrites the file from that copy so rows after the checkpoint
(written before a crash) never appear twice.

`loss.png` (train loss and eval loss against the step; for DPO/ORPO also the chosen and rejected rewards and the
margin, train and eval) is drawn with matplotlib's Agg canvas directly (no
pyplot global state) and written atomically at each checkpoint and at the end.

The end of a run: a summary table (`print_summary`) and summary.json; a finished run's summary.json is read back
(`finished_summary`) so a no-op re-run prints it in one line (`summary_line`) instead of rewriting it.

Progress: on a terminal, a rich progress bar (step/total, loss, lr, tokens/s, memory, ETA); otherwise (a
log file, CI) one plain line per logged step. Memory is CUDA's max allocated bytes on a GPU, the process
resident set size (current, and peak in the summary) on a CPU.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from lorafuse.atomic import write_atomic
from lorafuse.io_errors import writing


def memory_bytes(device: torch.device | str) -> int:
    """CUDA: max allocated since the start (or last reset); CPU: the current resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_memory_bytes(device)


def peak_memory_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Rows in memory plus `<dir>/metrics.jsonl` (when a dir is given), and the trackers in `report_to`
    (lorafuse.training.trackers; only with a dir, so only on the rank that writes the run folder)."""

    def __init__(self, out_dir: Path | None, report_to=(), config=None):
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None
        self.rows: list[dict] = []
        self.trackers = None
        if report_to and out_dir is not None:
            from lorafuse.training.trackers import Trackers

            self.trackers = Trackers(report_to, config, Path(out_dir))

    def append(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        if self.path is not None:
            with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def jsonl(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.rows)

    def restore(self, text: str) -> None:
        """Replace all rows (and the file) with `text`, the JSONL a checkpoint saved."""
        logged = self._file_rows()  # what the trackers got before this resume, rows past the checkpoint included
        self.rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if self.path is not None:
            write_atomic(self.path, self.jsonl())
        if self.trackers is not None:
            self.trackers.start(history=self.rows, logged=logged)

    def start_fresh(self) -> None:
        self.rows = []
        if self.path is not None:
            write_atomic(self.path, "")
        if self.trackers is not None:
            self.trackers.start(history=[], logged=None)

    def close(self, stop_reason: str | None) -> None:
        """End the trackers' runs (stop_reason None: the loop raised)."""
        if self.trackers is not None:
            self.trackers.finish(stop_reason)

    def _file_rows(self) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return rows

    def plot(self, path: Path) -> Path | None:
        """Train loss and eval loss against the step, as a PNG written atomically; with a preference objective's
        rows, a second panel with the rewards of the chosen and rejected answers and their margin."""
        train, evals = self._series("loss"), self._series("eval_loss")
        if not train and not evals:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rewards = {k: self._series(k) for k in REWARD_SERIES}
        rewards = {k: v for k, v in rewards.items() if v}
        fig = Figure(figsize=(7, 6.5 if rewards else 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(2 if rewards else 1, 1, 1)
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
        ax.set_ylabel("loss (nats/token)" if not rewards else "loss (per pair)")
        ax.grid(alpha=0.3)
        ax.legend()
        if rewards:
            low = fig.add_subplot(2, 1, 2, sharex=ax)
            for key, points in rewards.items():
                style = "o-" if key.startswith("eval_") else "-"
                low.plot(
                    *zip(*points),
                    style,
                    label=key.replace("eval_rewards/", "eval ").replace("rewards/", "reward "),
                    linewidth=1.2,
                )
            low.axhline(0.0, color="grey", linewidth=0.6)
            low.set_ylabel("reward")
            low.grid(alpha=0.3)
            low.legend(fontsize="small")
            ax = low
        ax.set_xlabel("optimizer step")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return write_atomic(Path(path), buf.getvalue())

    def _series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]


REWARD_SERIES = ("rewards/chosen", "rewards/rejected", "rewards/margin", "eval_rewards/margin")


def _fmt_mem(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A rich progress bar on a terminal, plain log lines elsewhere (module docstring)."""

    def __init__(self, console=None, total: int = 0, initial: int = 0, plain: bool | None = None):
        from rich.console import Console

        self.console = console or Console()
        self.total, self.start_step = total, initial
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self._bar = self._task = None
        if not self.plain:
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=initial, info="")
            self._bar.start()

    def update(self, step: int, row: dict, eta_s: float | None = None) -> None:
        info = " | ".join(self._fields(row))
        if self.plain:
            eta = f" | eta {_fmt_eta(eta_s)}" if eta_s is not None else ""
            self.console.print(f"step {step}/{self.total} | {info}{eta}", highlight=False, soft_wrap=True)
        else:
            self._bar.update(self._task, completed=step, info=info)

    @staticmethod
    def _fields(row: dict) -> list[str]:
        out = []
        if "eval_loss" in row:
            ppl = [f"eval_ppl {row['eval_ppl']:.2f}"] if row.get("eval_ppl") is not None else []
            return [f"eval_loss {row['eval_loss']:.4f}", *ppl]
        out.append("loss skipped (NaN/inf)" if row.get("loss") is None else f"loss {row['loss']:.4f}")
        if row.get("rewards/margin") is not None:  # a preference objective's step
            out.append(f"margin {row['rewards/margin']:.3f} | acc {row['rewards/accuracy']:.2f}")
        out.append(f"lr {row['lr']:.2e}")
        if row.get("tokens_per_s") is not None:
            out.append(f"{row['tokens_per_s']:.0f} tok/s")
        if row.get("memory_mb") is not None:
            out.append(f"mem {_fmt_mem(int(row['memory_mb'] * 2**20))}")
        return out

    def note(self, text: str) -> None:
        """A message printed above the bar (or as its own line)."""
        self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def print_summary(console, summary: dict) -> None:
    """The end-of-run summary: time, tokens, peak memory, losses, where the adapter is; one aligned line per item
    (a table would crop or wrap a long path)."""
    rows = [
        ("stopped", _fmt_stop(summary)),
        ("steps", f"{summary.get('steps')}"),
        ("time", _fmt_eta(summary.get("wall_s", 0.0))),
        ("tokens", f"{summary.get('tokens', 0):,} ({summary.get('tokens_per_s', 0):.0f}/s)"),
        ("peak memory", _fmt_mem(summary.get("peak_memory_bytes", 0))),
        ("first / last loss", _fmt_pair(summary.get("first_loss"), summary.get("last_loss"))),
        ("best eval loss", _fmt_best(summary)),
        ("adapter", summary.get("adapter_dir") or "not written (resume to finish)"),
    ]
    console.print("lorafuse run summary", style="bold", highlight=False)
    for key, value in rows:
        console.print(f"  {key:<18} {value}", highlight=False, markup=False, soft_wrap=True)


def _fmt_stop(summary: dict) -> str:
    reason = summary.get("stop_reason")
    if reason == "early_stopping":
        return f"early stopping (the adapter is the best checkpoint's, step {summary.get('best_step')})"
    return str(reason)


def _fmt_pair(a, b) -> str:
    return " / ".join("-" if v is None else f"{v:.4f}" for v in (a, b))


def _fmt_best(summary: dict) -> str:
    if summary.get("best_eval_loss") is None:
        return "- (no validation data)"
    return f"{summary['best_eval_loss']:.4f} at step {summary['best_step']} ({summary.get('best_checkpoint')})"


def finished_summary(out: Path) -> dict | None:
    """summary.json of a run that finished and whose adapter is in `out`, else None (then the re-run writes them).
    Its folder paths are the ones the run has now (a run folder may have been moved)."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    finished = isinstance(summary, dict) and summary.get("stop_reason") in ("finished", "early_stopping")
    if not finished or not (out / "adapter" / "adapter_config.json").is_file():
        return None
    return {**summary, "output_dir": str(out), "adapter_dir": str(out / "adapter")}


def summary_line(summary: dict) -> str:
    """A finished run's summary.json in one line (what a no-op re-run prints)."""
    best = "" if summary.get("best_eval_loss") is None else f", best eval loss {_fmt_best(summary)}"
    losses = _fmt_pair(summary.get("first_loss"), summary.get("last_loss"))
    return (
        f"{summary.get('stop_reason')} at step {summary.get('steps')} of {summary.get('total_steps')} "
        f"({summary.get('finished_at')}), first / last loss {losses}{best}; adapter: {summary.get('adapter_dir')}"
    )

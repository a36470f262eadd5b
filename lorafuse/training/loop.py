"""The training loop: one explicit loop over optimizer steps, exact resume, token-normalised accumulation.

Step s takes up to `grad_accum` micro-batches (never across an epoch end; the last window of an epoch may be
shorter). Its loss is the mean over the target tokens of the WHOLE window:

    loss_s = sum_{micro-batches b} sum_{targets t in b} -log p(y_t) / N_s,   N_s = target tokens in the window

so accumulation equals one big batch whatever the padding or the window size. Each micro-batch backpropagates
`loss_sum_b / N_s` (N_s is counted before the first forward: the window's batches are fetched up front).
Targets are labels != -100 after the causal shift (the token at t predicts label t+1).

The summed loss comes from hidden states through the output head in chunks (`lorafuse.training.loss`): the
(B, T, V) logits are never materialised.

Precision (bf16 autocast / fp16 + GradScaler on CUDA, fp32 on CPU), fp32 trainable masters and non-reentrant
gradient checkpointing: `lorafuse.training.runtime`.

A step whose loss is NaN/inf is skipped (no update, grads zeroed, a row with "skipped": true); more than
`nan_tolerance` in a row stop the run with the likely causes. No scheduled checkpoint is written during such a streak,
and when the run stops on it, the checkpoint written just before it (from the weights that then gave NaN losses) is
set aside, so "lower train.lr and resume" resumes from weights that worked. A checkpoint is never written from
non-finite weights (lorafuse.training.checkpoint). SIGTERM/SIGINT finish the current step, save a checkpoint, print
"stopped at step N; checkpoint-N saved; run the same command to resume" and return (stop_reason "signal"); a second
SIGINT interrupts at once. A signal during the last step lets the run finish normally.

Checkpoints: every `save_every` steps when set, else at each epoch end; also at each new best evaluation and at
the end. The data's sha256 (`data_fingerprint`, of the tokenized rows) is saved with each; a resume on other data
is refused unless forced.

Resume is exact: trainable tensors, optimizer, scaler, RNG (python, numpy, torch, CUDA), data position
(epoch, micro-batch within the epoch; batches are a deterministic function of (seed, epoch)) and counters
are restored, so on a CPU the resumed losses equal an uninterrupted run's bit for bit.

Several processes (torchrun): `world` (lorafuse.training.distributed) makes N_s the global target count, sums the
gradients over the ranks once per step, shards evaluation, and keeps every file write on rank 0.

Out of GPU memory in a step (`lorafuse.training.oom`): the partial step is dropped and retried once with the
planner's next smaller setting (checkpointing on, or the window's micro-batches re-split into smaller ones with
the same rows and the same N_s); a second OOM stops the run with the settings tried and `lorafuse plan`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorafuse import accel
from lorafuse.config import options_for
from lorafuse.errors import LorafuseError
from lorafuse.options import Options
from lorafuse.outputs import ensure_writable_dir
from lorafuse.training import checkpoint as ckpt
from lorafuse.training import graphs
from lorafuse.training.distributed import SINGLE
from lorafuse.training.loss import count_inputs, count_targets, evaluate, forward_batch, lm_loss_sum
from lorafuse.training.metrics import MetricsLog, Progress, memory_bytes, peak_memory_bytes
from lorafuse.training.oom import OomRetry
from lorafuse.training.optim import LRSchedule, build_optimizer
from lorafuse.training.runtime import Precision, StopSignals

# --------------------------------------------------------------------------------------------- setup


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


class TrainingLoop:
    """Optimizer steps over `train_batches` (anything with `epoch_batches(epoch)` and `len`) until the last
    step, early stopping or a signal. `tc` is a TrainConfig; `out_dir` None keeps everything in memory."""

    def __init__(
        self,
        model,
        train_batches,
        tc,
        *,
        val_batches=None,
        out_dir=None,
        config=None,
        compute_dtype: torch.dtype = torch.float32,
        console=None,
        adapter_writer=None,
        world=SINGLE,
        options: Options | None = None,
        data_fingerprint: str | None = None,
    ):
        from rich.console import Console

        self.model, self.train_batches, self.val_batches, self.tc = model, train_batches, val_batches, tc
        self.world = world  # rank 0 alone writes out_dir
        self.out_dir = (
            None if out_dir is None else Path(out_dir) if not world.is_main else ensure_writable_dir(Path(out_dir))
        )
        self.data_fingerprint = data_fingerprint
        self.config, self.adapter_writer = config, adapter_writer
        self.console = console or Console()
        self.progress: Progress | None = None
        self.device = next(model.parameters()).device
        self.precision = Precision(self.device, compute_dtype)
        self.options = options or options_for(tc)
        self.accel = accel.prepare(model, self.options, note=self._note)  # the job restores the model afterwards
        self.params, self.head, self.fused = self.accel.params, self.accel.head, self.accel.fused_loss
        self.optimizer = build_optimizer(tc.optimizer, self.params, tc.lr, tc.weight_decay)
        self.graphed = graphs.for_loop(self, self.options.cuda_graphs)
        micro = len(train_batches)
        if micro == 0:
            raise LorafuseError("there are no training batches", "check data.path and data.num_rows")
        self.total = total_steps(tc, micro)
        self.schedule = LRSchedule(tc.lr, self.total, tc.warmup_steps, tc.scheduler)
        self.state = LoopState(micro_per_epoch=micro)
        self.metrics = MetricsLog(self.out_dir if world.is_main else None, tc.report_to, config)
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._rng: dict | None = None
        self._iter = None
        self._win = self._new_window()
        self.oom = OomRetry(self)

    # ------------------------------------------------------------------------------------- resume
    def resume(self, folder: Path, force: bool = False) -> None:
        """Restore tensors, optimizer, counters, metrics and (at run start) RNG from a checkpoint folder.
        force: go on although the data changed since the checkpoint (same micro-batch count, other rows)."""
        restored = ckpt.load_checkpoint(
            folder, model=self.model, optimizer=self.optimizer, scaler=self.precision.scaler
        )
        saved = restored["trainer_state"]
        self.world.check_resume(saved, folder)
        if saved["micro_per_epoch"] != self.state.micro_per_epoch:
            raise LorafuseError(
                f"{folder} was trained with {saved['micro_per_epoch']} micro-batches per epoch, the data now "
                f"gives {self.state.micro_per_epoch}: the data file or its settings changed",
                "resume with the same data, or start over with --no-resume",
            )
        self._check_data(saved.get("data_sha256"), folder, force)
        names = set(LoopState.__dataclass_fields__)
        self.state = LoopState(**{k: v for k, v in saved.items() if k in names})
        self._rng = self.world.own_rng(restored["rng"])
        self._win.update(saved.get("log_window", {}))
        self.metrics.restore(restored["metrics_jsonl"])
        self.last_checkpoint, self._saved_step = Path(folder), self.state.step
        if self.out_dir is not None and self.world.is_main:  # the best pointer must match the timeline we continue
            ckpt.reset_best(self.out_dir, self.state.best_step, self.state.best_eval)

    def _check_data(self, saved: str | None, folder: Path, force: bool) -> None:
        """The same number of micro-batches but other rows: refused unless forced (older checkpoints: unchecked)."""
        if saved is None or self.data_fingerprint is None or saved == self.data_fingerprint:
            return
        if not force:
            raise LorafuseError(
                f"the training data changed since {folder.name} was saved (the same number of batches, but other "
                "rows or tokens: the data file, its settings or the tokenizer changed)",
                "resume with the data the checkpoint was trained on, pass --force (force=True) to go on with the new "
                "data from this point, or start over with --no-resume",
            )
        self._note(f"resuming {folder.name} on changed training data (--force)")

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> LoopResult:
        st, t_start = self.state, time.perf_counter()
        if self._rng is None:
            ckpt.seed_everything(self.tc.seed + self.world.rank)  # ranks draw different dropout masks
            self.metrics.start_fresh()
        else:
            ckpt.set_rng_state(self._rng)  # last: after everything at setup that consumed randomness
        self.world.broadcast_params(self.params)
        start_step, stop = st.step, ("already_complete" if st.step >= self.total else None)
        self.progress = Progress(self.console, total=self.total, initial=st.step)
        try:
            with StopSignals() as signals:
                self.model.train()
                while stop is None:
                    t0 = time.perf_counter()
                    batches, epoch_end = self._next_window()
                    row = self._optimizer_step(batches)
                    st.train_seconds += time.perf_counter() - t0
                    eta = (self.total - st.step) * (time.perf_counter() - t_start) / (st.step - start_step)
                    stop = self._after_step(row, epoch_end, signals, eta)
        finally:
            self.progress.close()
            self.metrics.close(stop)
        if stop == "signal":
            saved = f"{self.last_checkpoint.name} saved" if self.last_checkpoint else "no output folder, nothing saved"
            self._note(f"stopped at step {st.step}; {saved}; run the same command to resume")
        return self._result(stop, time.perf_counter() - t_start, signals.received if stop == "signal" else None)

    def _next_window(self) -> tuple[list[dict], bool]:
        """The next step's micro-batches (at most grad_accum, never across an epoch end) and epoch-end flag."""
        st, micro = self.state, self.state.micro_per_epoch
        if self._iter is None:  # (re)start an epoch; mid-epoch after a resume: same order, from micro_index
            self._iter = iter(self.train_batches.epoch_batches(st.epoch, start=st.micro_index))
        take = min(self.tc.grad_accum, micro - st.micro_index)
        batches = [next(self._iter) for _ in range(take)]
        st.micro_index += take
        if st.micro_index < micro:
            return batches, False
        st.epoch, st.micro_index, self._iter = st.epoch + 1, 0, None
        return batches, True

    def _optimizer_step(self, batches: list[dict]) -> dict:
        """Forward/backward every micro-batch with loss_sum / N_window, then clip and update (or skip)."""
        st = self.state
        lr = self.schedule.apply(self.optimizer, st.step)
        graphs.seed_dropout(self)
        n_target, n_input = self.world.all_reduce_sum(
            [sum(count_targets(b) for b in batches), sum(count_inputs(b) for b in batches)]
        )
        total = self.oom.accumulate(batches, n_target)  # forward/backward; after an OOM: smaller, retried once
        loss = self.world.sync_gradients(self.params, total) / n_target if n_target else math.nan
        grad_norm, skipped = self._update(loss)
        self.optimizer.zero_grad(set_to_none=self.graphed is None)  # a CUDA graph accumulates into the same .grad
        st.step += 1
        st.tokens += n_input
        st.target_tokens += 0 if skipped else n_target
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "n_input": n_input,
            "n_target": n_target,
            "skipped": skipped,
        }

    def _micro_steps(self, batches: list[dict], n_target: int) -> torch.Tensor:
        """Forward/backward each micro-batch with loss_sum / N_window; returns the summed loss (fp32, on device)."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in batches if n_target else []:
            inputs = forward_batch(self.model, batch, self.precision)
            if self.graphed is not None:
                total += self.graphed(inputs, 1.0 / n_target)
                continue
            with self.precision.autocast():
                loss_sum = lm_loss_sum(self.model, inputs, self.head, self.fused)
            self.precision.backward(loss_sum / n_target)
            total += loss_sum.detach()
        return total

    def _update(self, loss: float) -> tuple[float | None, str | None]:
        """Clip and step. Returns (grad norm before clipping, None | why the step was skipped)."""
        if not math.isfinite(loss):
            return None, "nan"
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.tc.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)  # skips the update itself when a gradient is inf/NaN
            scaler.update()
            return grad_norm, ("fp16_overflow" if scaler.get_scale() < scale else None)
        if not math.isfinite(grad_norm):
            return grad_norm, "nan"
        self.optimizer.step()
        return grad_norm, None

    def _after_step(self, row: dict, epoch_end: bool, signals: StopSignals, eta: float) -> str | None:
        st, tc = self.state, self.tc
        last = st.step >= self.total
        self._log(row, force=last, eta=eta)
        if row["skipped"] == "nan":
            st.nan_streak, st.skipped_steps = st.nan_streak + 1, st.skipped_steps + 1
            if st.nan_streak > tc.nan_tolerance:
                raise self._diverged()
        elif not row["skipped"]:
            st.nan_streak = 0
        improved, stop = False, None
        due = (st.step % tc.eval_every == 0) if tc.eval_every else epoch_end
        if self.val_batches is not None and (due or last):
            improved = self._evaluate()
            patience = tc.early_stopping_patience
            if patience and st.evals_since_best >= patience:
                self._note(
                    f"early stopping: no better eval loss in {patience} evaluations "
                    f"(best {st.best_eval:.4f} at step {st.best_step})"
                )
                stop = "early_stopping"
        signalled = self.world.any(signals.received is not None)  # a collective: every rank, every step
        if stop is None and (last or signalled):
            stop = "finished" if last else "signal"
        if st.nan_streak and stop in ("finished", "early_stopping"):
            raise self._diverged()  # the final weights gave NaN losses: no checkpoint, no adapter from them
        due = (st.step % tc.save_every == 0) if tc.save_every else epoch_end
        if stop or improved or (due and not st.nan_streak):  # no scheduled save from weights that gave NaN
            self._save(improved)
        return stop

    def _diverged(self) -> LorafuseError:
        """Too many NaN steps, or the run ended in NaN steps: set aside the checkpoints written from the weights that
        gave them (the one just before the streak, any during it), so the resume the error advises starts from
        weights that worked."""
        st, out = self.state, self.out_dir
        first = st.step - st.nan_streak + 1
        moved, last_good = None, None
        if out is not None and self.world.is_main:
            moved = ckpt.archive_newer(out, first - 2)  # checkpoint-(first-1) holds the weights step `first` used
            last_good = ckpt.latest_checkpoint(out)
        names = ", ".join(sorted(p.name for p in moved.iterdir())) if moved else ""
        aside = f"; {names} (from the weights that gave the first NaN loss) moved to {moved}" if moved else ""
        return nan_error(st, self.tc.nan_tolerance, last_good, aside)

    # ------------------------------------------------------------------------------------- logging, eval, save
    def _new_window(self) -> dict:
        return {"loss_sum": 0.0, "targets": 0, "inputs": 0, "t0": time.perf_counter()}

    def _epoch_float(self) -> float:
        st = self.state
        return round(st.epoch + st.micro_index / st.micro_per_epoch, 4)

    def _log(self, row: dict, force: bool, eta: float) -> None:
        st, w = self.state, self._win
        w["inputs"] += row["n_input"]
        if row["skipped"]:
            self.metrics.append(
                {
                    "step": st.step,
                    "epoch": self._epoch_float(),
                    "loss": None,
                    "lr": row["lr"],
                    "grad_norm": row["grad_norm"],
                    "skipped": True,
                    "reason": row["skipped"],
                }
            )
            why = "NaN/inf loss" if row["skipped"] == "nan" else "fp16 overflow (loss scale lowered)"
            self._note(f"step {st.step}: skipped ({why})")
        else:
            w["loss_sum"] += row["loss"] * row["n_target"]
            w["targets"] += row["n_target"]
        if not (force or st.step % self.tc.log_every == 0) or not w["targets"]:
            return
        seconds = max(time.perf_counter() - w["t0"], 1e-9)
        out = {
            "step": st.step,
            "epoch": self._epoch_float(),
            "loss": w["loss_sum"] / w["targets"],
            "lr": row["lr"],
            "grad_norm": row["grad_norm"],
            "tokens": st.tokens,
            "tokens_per_s": round(w["inputs"] / seconds, 1),
            "memory_mb": round(memory_bytes(self.device) / 2**20, 1),
            "time_s": round(st.train_seconds, 3),
        }
        self.metrics.append(out)
        self.progress.update(st.step, out, eta_s=eta)
        self._win = self._new_window()

    def _evaluate(self) -> bool:
        st = self.state
        # with graphs, on their stream: an eager pass elsewhere would leave a cuBLAS workspace for the run's rest
        with self.graphed.on_stream() if self.graphed is not None else contextlib.nullcontext():
            loss, ppl = evaluate(self.model, self.val_batches, self.precision, self.head, self.fused, self.world)
        row = {"step": st.step, "epoch": self._epoch_float(), "eval_loss": loss, "eval_ppl": ppl}
        self.metrics.append(row)
        self._note(f"step {st.step}: eval_loss {loss:.4f} | eval_ppl {ppl:.2f}")
        if st.best_eval is None or loss < st.best_eval:
            st.best_eval, st.best_step, st.evals_since_best = loss, st.step, 0
            return True
        st.evals_since_best += 1
        return False

    def _save(self, improved: bool) -> None:
        if self.out_dir is None:
            return
        st, world = self.state, self.world
        if self._saved_step != st.step:
            window = {k: self._win[k] for k in ("loss_sum", "targets", "inputs")}  # a log row may span a save
            trainer_state = {
                **asdict(st),
                "total_steps": self.total,
                "data_sha256": self.data_fingerprint,
                "schedule": self.schedule.state_dict(),
                "log_window": window,
                "world_size": world.size,
            }
            rng = world.gather_rng()  # a collective: every rank's state, on rank 0
            self.last_checkpoint = (
                ckpt.save_checkpoint(
                    self.out_dir,
                    st.step,
                    model=self.model,
                    optimizer=self.optimizer,
                    trainer_state=trainer_state,
                    scaler=self.precision.scaler,
                    config=self.config,
                    metrics_jsonl=self.metrics.jsonl(),
                    adapter_writer=self.adapter_writer,
                    rng_states=rng,
                )
                if world.is_main
                else self.out_dir / f"checkpoint-{st.step}"
            )
            self._saved_step = st.step
        if world.is_main:
            if improved:
                ckpt.write_best(self.out_dir, st.step, st.best_eval)
            ckpt.rotate(self.out_dir, self.tc.save_total_limit)
            self.metrics.plot(self.out_dir / "loss.png")
        world.barrier()  # the others wait for rank 0's files (a failed save stops the job here)

    def _note(self, text: str) -> None:
        (self.progress.note if self.progress is not None else self.console.print)(text)

    def _result(self, stop: str, wall: float, signal_name: str | None = None) -> LoopResult:
        losses = [r["loss"] for r in self.metrics.rows if r.get("loss") is not None]
        best = None
        if self.out_dir is not None and self.state.best_step is not None:
            best = self.out_dir / f"checkpoint-{self.state.best_step}"
        return LoopResult(
            state=self.state,
            stop_reason=stop,
            total_steps=self.total,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            wall_s=wall,
            peak_memory_bytes=peak_memory_bytes(self.device),
            last_checkpoint=self.last_checkpoint,
            best_checkpoint=best,
            rows=list(self.metrics.rows),
            stop_signal=signal_name,
        )


def train_loop(model, train_batches, tc, *, resume_from: Path | None = None, **kwargs) -> LoopResult:
    """Build a TrainingLoop, resume it from `resume_from` when given, run it."""
    loop = TrainingLoop(model, train_batches, tc, **kwargs)
    if resume_from is not None:
        loop.resume(resume_from)
    return loop.run()

"""The training loop: one explicit loop over optimizer steps, exact resume, unit-normalised accumulation.

Step s takes up to `grad_accum` micro-batches (never across an epoch end; the last window of an epoch may be
shorter). The objective (lorafuse.training.objectives: sft, dpo, orpo) gives each micro-batch b its loss SUM L_b and
its count of normalisation units u_b (target tokens for SFT, pairs for DPO/ORPO); the step's loss is the mean per
unit over the WHOLE window:

    loss_s = sum_{micro-batches b} L_b / U_s,   U_s = sum_b u_b      (SFT: L_b = sum_{targets t} -log p(y_t))

so accumulation equals one big batch whatever the padding or the window size. Each micro-batch backpropagates
`L_b / U_s` (U_s is counted before the first forward: the window's batches are fetched up front); the objective's
metrics (DPO's rewards and margins, ...) are summed the same way and logged as means per unit. For SFT, targets are
labels != -100 after the causal shift (the token at t predicts label t+1), and the summed loss comes from hidden
states through the output head in chunks (`lorafuse.training.loss`): the (B, T, V) logits are never materialised.

`TrainingLoop.step` is the step, top to bottom: learning rate, dropout seed, the window's units, the micro-steps
(a CUDA graph replay or eager), the out-of-memory decision and its single retry (`lorafuse.training.oom`), the
gradient sync, clipping and the update (or a skip, decided on the device: `lorafuse.training.update`), the counters.
`_finish` then logs its row and counts a skip; `_after_step` evaluates (`lorafuse.training.validation`) and saves.

The host never waits for the GPU inside a step: nothing in it reads a device value. Its numbers (loss, metrics,
gradient norm, whether it was skipped) are read one step later, when the next step is already queued behind them
(`_after_launch`), so the GPU runs on while the host logs and prepares the next window. A step whose outcome decides
something before the next one may be queued is read at once: an evaluation or checkpoint of its weights, the last
step, a stop signal, a NaN streak at train.nan_tolerance. Rows, counters and checkpoints are those of a loop that
reads every step at once. A row's time_s is when the device finished its step (lorafuse.training.readback.StepClock),
counted from the run's start without the time of evaluations and checkpoints.

Precision (bf16 autocast / fp16 + GradScaler on CUDA, fp32 on CPU): `lorafuse.training.runtime`. What changes the
model for speed or memory (fp32 masters, checkpointing, the fast path, host tables): `lorafuse.accel`, prepared
here and restored by the job.

A step whose loss is NaN/inf is skipped (no update, grads zeroed, a row with "skipped": true); more than
`nan_tolerance` in a row stop the run with the likely causes. No scheduled checkpoint is written during such a streak,
and when the run stops on it, the checkpoint written just before it (from the weights that then gave NaN losses) is
set aside, so "lower train.lr and resume" resumes from weights that worked. A checkpoint is never written from
non-finite weights (lorafuse.training.checkpoint). SIGTERM/SIGINT finish the current step, save a checkpoint, print
"stopped at step N; checkpoint-N saved; run the same command to resume" and return (stop_reason "signal"); a second
SIGINT interrupts at once. A signal during the last step lets the run finish normally.

Checkpoints: every `save_every` steps when set, else at each epoch end; also at each new best evaluation and at
the end. The data's sha256 (`data_fingerprint`, of the tokenized rows) is saved with each; a resume on other data
is refused unless forced. DPO's precomputed reference log-probs (`reference_logps`, set by the job) are saved
with each too.

Resume is exact: trainable tensors, optimizer, scaler, RNG (python, numpy, torch, CUDA), data position
(epoch, micro-batch within the epoch; batches are a deterministic function of (seed, epoch)) and counters
are restored, so on a CPU the resumed losses equal an uninterrupted run's bit for bit.

Several processes (torchrun): `world` (lorafuse.training.distributed) makes U_s the global unit count, sums the
gradients over the ranks once per step, shards evaluation, and keeps every file write on rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

from lorafuse import accel
from lorafuse.config import options_for
from lorafuse.errors import LorafuseError
from lorafuse.options import Options
from lorafuse.outputs import ensure_writable_dir
from lorafuse.training import graphs, loop_io, oom, rng, validation
from lorafuse.training.distributed import SINGLE
from lorafuse.training.loss import count_inputs, count_targets
from lorafuse.training.metrics import MetricsLog, Progress, memory_bytes, peak_memory_bytes
from lorafuse.training.objectives import ObjectiveContext
from lorafuse.training.objectives.sft import SFTObjective
from lorafuse.training.optim import LRSchedule, build_optimizer, param_groups
from lorafuse.training.readback import StepClock
from lorafuse.training.runtime import Precision, StopSignals
from lorafuse.training.state import LoopResult, LoopState, diverged, total_steps
from lorafuse.training.steplog import LogWindow, log_step
from lorafuse.training.update import StepRecord, clip_and_step


class TrainingLoop:
    """Optimizer steps over `train_batches` (anything with `epoch_batches(epoch)` and `len`) until the last
    step, early stopping or a signal. `tc` is a TrainConfig; `out_dir` None keeps everything in memory;
    `objective` (default SFT) gives the loss."""

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
        objective=None,
    ):
        from rich.console import Console

        self.model, self.train_batches, self.val_batches, self.tc = model, train_batches, val_batches, tc
        self.world = world  # rank 0 alone writes out_dir
        self.out_dir = (
            None if out_dir is None else Path(out_dir) if not world.is_main else ensure_writable_dir(Path(out_dir))
        )
        self.data_fingerprint = data_fingerprint
        self.config, self.adapter_writer = config, adapter_writer
        self.objective = objective or SFTObjective()
        self.console = console or Console()
        self.progress: Progress | None = None
        self.device = next(model.parameters()).device
        self.precision = Precision(self.device, compute_dtype)
        self._prepare(options or options_for(tc))  # the job restores the model afterwards (accel.restore)
        modules_scale = (tc.modules_to_save_lr or tc.lr) / tc.lr
        rows_scale = (tc.token_rows_lr or tc.lr) / tc.lr
        groups = param_groups(model, self.params, tc.loraplus_lr_ratio, modules_scale, token_rows_scale=rows_scale)
        self.optimizer = build_optimizer(tc.optimizer, groups, tc.lr, tc.weight_decay)
        micro = len(train_batches)
        if micro == 0:
            raise LorafuseError("there are no training batches", "check data.path and data.num_rows")
        self.total = total_steps(tc, micro)
        self.schedule = LRSchedule(tc.lr, self.total, tc.warmup_steps, tc.scheduler)
        self.state = LoopState(micro_per_epoch=micro)
        self.metrics = MetricsLog(self.out_dir if world.is_main else None, tc.report_to, config)
        self.window = LogWindow(self.objective.metric_names)
        self.reference_logps: dict | None = None  # DPO's precomputed reference, saved with each checkpoint
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._rng: dict | None = None
        self._iter = None
        self._pending: StepRecord | None = None  # a queued step whose row is not logged yet (`_after_launch`)
        self._timer = StepClock(self.device)  # when the device finished each step (`_finish`)
        self._started: tuple[float, int] | None = None  # the run's start time and first step, set by `run`
        self._clock = 0.0  # where time_s was last brought up to date (perf_counter seconds)

    def _prepare(self, options: Options) -> None:
        """The model prepared for `options` (lorafuse.accel), the objective's context, and the CUDA-graphed step."""
        self.accel = accel.prepare(self.model, options, note=self.note)
        self.params = self.accel.params
        self.ctx = ObjectiveContext(self.precision, self.accel.head, self.accel.fused_loss)
        world_size, mode = self.world.size, options.cuda_graphs
        self.graphed = graphs.build(self.model, self.accel, self.precision, world_size, mode, self.objective, self.note)

    def setting(self) -> dict:
        """The micro-batch setting in force: the config's, with the changes made after out-of-memory errors."""
        return oom.current_setting(self.tc, self.state.oom_overrides)

    def _match_setting(self) -> None:
        """Checkpointing turned on after an out-of-memory error (this run's or one before a resume): the model is
        prepared again through accel with it, and the graphed step rebuilt for the new modules."""
        if self.setting()[oom.CK] and not self.accel.options.gradient_checkpointing:
            self._prepare(dataclasses.replace(self.accel.options, gradient_checkpointing=True))

    # ------------------------------------------------------------------------------------- resume
    def resume(self, folder: Path, force: bool = False) -> None:
        """Restore tensors, optimizer, counters, metrics and (at run start) RNG from a checkpoint folder.
        force: go on although the data changed since the checkpoint (same micro-batch count, other rows)."""
        loop_io.restore(self, folder, force)

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> LoopResult:
        st, t_start = self.state, time.perf_counter()
        if self._rng is None:
            rng.seed_everything(self.tc.seed + self.world.rank)  # ranks draw different dropout masks
            self.metrics.start_fresh()
        else:
            rng.set_rng_state(self._rng)  # last: after everything at setup that consumed randomness
        self.world.broadcast_params(self.params)
        patience = self.tc.early_stopping_patience
        stopped_early = bool(patience) and st.evals_since_best >= patience  # a run that stopped early is finished
        start_step, stop = st.step, ("already_complete" if st.step >= self.total or stopped_early else None)
        self.progress = Progress(self.console, total=self.total, initial=st.step)
        self._started, self._clock = (t_start, start_step), time.perf_counter()
        try:
            with StopSignals() as signals:
                self.model.train()
                while stop is None:
                    batches, epoch_end = self._next_window()
                    stop = self._after_launch(self.step(batches), epoch_end, signals)
        except BaseException:
            self._finish_pending_quietly()
            raise
        finally:
            self.progress.close()
            self.metrics.close(stop)
        if stop == "signal":
            saved = f"{self.last_checkpoint.name} saved" if self.last_checkpoint else "no output folder, nothing saved"
            self.note(f"stopped at step {st.step}; {saved}; run the same command to resume")
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

    def step(self, batches: list[dict]) -> StepRecord:
        """One optimizer step over a window of micro-batches, queued on the device. Returns its record: what the
        host knew, and the values (loss, metrics, gradient norm, skip) that `_finish` reads when they are needed."""
        st, tc, world, objective = self.state, self.tc, self.world, self.objective
        lr = self.schedule.apply(self.optimizer, st.step)
        graphs.seed_dropout(self.model, tc.seed, world.rank, tc.grad_accum, st.step)  # the fast path's masks
        units, n_target, n_input = world.all_reduce_sum(
            [sum(map(objective.units, batches)), sum(map(count_targets, batches)), sum(map(count_inputs, batches))]
        )
        rng = oom.rng_state(self.device)
        sums, error = self._micro_steps(batches, units)  # forward/backward, gradients accumulated in .grad
        if error is not None:  # out of memory: drop the partial step, take the next smaller setting, retry once
            sums = oom.retry(self, batches, units, rng, error)
        sums = world.sync_gradients(self.params, sums)  # one all-reduce under torchrun
        max_norm, scaler = tc.max_grad_norm or math.inf, self.precision.scaler
        values, reason = clip_and_step(self.optimizer, self.params, max_norm, sums, units, scaler)
        self.optimizer.zero_grad(set_to_none=self.graphed is None)  # a CUDA graph accumulates into the same .grad
        st.step += 1
        st.tokens += n_input
        return StepRecord(
            step=st.step,
            epoch=self._epoch_float(),
            lr=lr,
            units=units,
            n_input=n_input,
            n_target=n_target,
            tokens=st.tokens,
            memory_mb=round(memory_bytes(self.device) / 2**20, 1),
            last=st.step >= self.total,
            values=values,
            done=self._timer.mark(),
            reason=reason,
        )

    def _micro_steps(self, batches: list[dict], units: int) -> tuple[torch.Tensor | None, str | None]:
        """Forward/backward each micro-batch, re-split to the setting in force, with L_b / U. Returns the window's
        sums (fp32 (1 + metrics,) on the device: the loss, then each metric) and None, or None and the first line
        of an out-of-memory error (the exception, which holds the activations, is released on return)."""
        rows, multiple = self.setting()[oom.MB], getattr(self.train_batches, "pad_to_multiple_of", 1)
        pieces = [p for b in batches for p in oom.split_batch(b, rows, multiple)]
        names = self.objective.metric_names
        sums = torch.zeros(1 + len(names), dtype=torch.float32, device=self.device)
        try:
            for batch in pieces if units else []:
                if self.graphed is not None:  # the forward(s) + backward replayed as one CUDA graph
                    out = self.graphed(self.objective.inputs(self.model, batch, self.precision), 1.0 / units)
                    sums += out.reshape(-1)  # SFT: the loss sum; a preference objective: it and the metric sums
                    continue
                loss_sum, metrics = self.objective.loss_sum(self.model, batch, self.ctx)
                self.precision.backward(loss_sum / units)
                sums += torch.stack([loss_sum.detach(), *(metrics[n] for n in names)])
        except RuntimeError as exc:
            if not oom.is_oom(exc):
                raise
            return None, oom.first_line(exc)
        return sums, None

    # ------------------------------------------------------------------------------------- after the step
    def _after_launch(self, record: StepRecord, epoch_end: bool, signals: StopSignals) -> str | None:
        """The previous step's row (its values are ready: the GPU has this step queued behind them), then this
        step's: at once where a decision needs it (evaluation, a save, the last step, a signal, a NaN streak at
        its limit), else at the next step, so the host reads nothing while the GPU would wait for it."""
        self._finish_pending()
        signalled = self.world.any(signals.received is not None)  # a collective: every rank, every step
        if not self._needs_values_now(epoch_end, signalled):
            self._pending = record
            return None
        self._finish(record)
        return self._after_step(epoch_end, signalled)

    def _needs_values_now(self, epoch_end: bool, signalled: bool) -> bool:
        """Whether this step's outcome decides something before the next step may be queued: a checkpoint or an
        evaluation of its weights, the run's end, or a stop on too many NaN steps (this one would be the one)."""
        st, tc = self.state, self.tc
        if st.step >= self.total or signalled or st.nan_streak >= tc.nan_tolerance:
            return True
        evaluates = self.val_batches is not None and ((st.step % tc.eval_every == 0) if tc.eval_every else epoch_end)
        return evaluates or ((st.step % tc.save_every == 0) if tc.save_every else epoch_end)

    def _finish_pending(self) -> None:
        if self._pending is not None:
            record, self._pending = self._pending, None
            self._finish(record)

    def _finish_pending_quietly(self) -> None:
        """After an error in the loop: the last queued step's row still logged, as an uninterrupted log has it; an
        error while reading it back (the device may be what failed) gives way to the first one."""
        with contextlib.suppress(Exception):
            self._finish_pending()

    def _finish(self, record: StepRecord) -> None:
        """Read the step's values back (waiting for the device if needed), log its row, count its skip, and stop the
        run after too many NaN steps in a row."""
        st, tc = self.state, self.tc
        row = record.row(self.objective.metric_names)
        st.target_tokens += 0 if row["skipped"] else record.n_target
        # when the device finished the step, not when it was read (never before the clock: the GPU's timer and the
        # host's may drift apart by microseconds)
        end = max(self._timer.seconds(record.done), self._clock)
        st.train_seconds, self._clock = st.train_seconds + end - self._clock, end
        t_start, start_step = self._started
        log_step(self, record, row, end, eta=(self.total - record.step) * (end - t_start) / (record.step - start_step))
        if row["skipped"] == "nan":
            st.nan_streak, st.skipped_steps = st.nan_streak + 1, st.skipped_steps + 1
            if st.nan_streak > tc.nan_tolerance:
                raise diverged(st, tc.nan_tolerance, self.out_dir if self.world.is_main else None)
        elif not row["skipped"]:
            st.nan_streak = 0

    def _after_step(self, epoch_end: bool, signalled: bool) -> str | None:
        """Evaluate, decide whether to stop, save: the cadence of train.*_every (the step's row is logged)."""
        st, tc = self.state, self.tc
        last, out = st.step >= self.total, self.out_dir if self.world.is_main else None
        improved, stop = False, None
        due = (st.step % tc.eval_every == 0) if tc.eval_every else epoch_end
        if self.val_batches is not None and (due or last):
            improved, stop = validation.evaluate_step(self)  # stop: "early_stopping" once patience is spent
        if stop is None and (last or signalled):
            stop = "finished" if last else "signal"
        if st.nan_streak and stop in ("finished", "early_stopping"):  # no checkpoint, no adapter from NaN weights
            raise diverged(st, tc.nan_tolerance, out)
        due = (st.step % tc.save_every == 0) if tc.save_every else epoch_end
        if stop or improved or (due and not st.nan_streak):  # no scheduled save from weights that gave NaN
            self._save(improved)
        self._clock = time.perf_counter()  # evaluation and checkpoints are not counted in time_s
        return stop

    def _epoch_float(self) -> float:
        st = self.state
        return round(st.epoch + st.micro_index / st.micro_per_epoch, 4)

    def _save(self, improved: bool) -> None:
        """A checkpoint of this step (once per step), the best pointer, rotation and the loss plot (rank 0)."""
        loop_io.save(self, improved)

    def note(self, text: str) -> None:
        """A line above the progress bar (or printed, before the bar exists)."""
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
            speedups={
                "fast_path": self.accel.fast is not None,
                "fused_loss": bool(self.accel.fused_loss),
                "cuda_graph_replays": 0 if self.graphed is None else self.graphed.replays,
            },
        )


def train_loop(model, train_batches, tc, *, resume_from: Path | None = None, **kwargs) -> LoopResult:
    """Build a TrainingLoop, resume it from `resume_from` when given, run it."""
    loop = TrainingLoop(model, train_batches, tc, **kwargs)
    if resume_from is not None:
        loop.resume(resume_from)
    return loop.run()

"""The training loop on a tiny Llama with a trainable subset (no LoRA module needed)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import warnings

import pytest
import torch
from rich.console import Console
from torch.nn.attention import SDPBackend, sdpa_kernel
from toy import ToyBatches, toy_model

from lorafuse.config import TrainConfig
from lorafuse.errors import LorafuseError
from lorafuse.training import validation
from lorafuse.training.loop import TrainingLoop, total_steps, train_loop


def _tc(**kw):
    base = dict(
        max_steps=6,
        grad_accum=2,
        lr=5e-3,
        warmup_steps=1,
        optimizer="adamw",
        gradient_checkpointing=False,
        log_every=1,
        save_total_limit=10,
    )
    return TrainConfig(**{**base, **kw})


def _losses(rows, key="loss"):
    return [(r["step"], r.get(key), r.get("lr"), r.get("grad_norm")) for r in rows if key in r]


class _Fixed:
    """Batches given explicitly (one epoch, the same every epoch)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def epoch_batches(self, epoch, start=0):
        yield from self.batches[start:]


def _capture_grads(loop):
    grads = []
    step = loop.optimizer.step

    def capture(*a, **k):
        grads.append([p.grad.clone() for p in loop.params])
        return step(*a, **k)

    loop.optimizer.step = capture
    return grads


def test_accumulation_is_normalised_by_the_tokens_of_the_whole_step():
    micro = list(ToyBatches(n_micro=3, micro_batch_size=2, seq_len=12).epoch_batches(0))
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    assert len(set(counts)) > 1, "micro-batches must differ in target tokens for this test to mean anything"
    whole = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    grads, losses = [], []
    for batches, accum in ((micro, 3), ([whole], 1)):
        loop = TrainingLoop(toy_model(dropout=0.0), _Fixed(batches), _tc(max_steps=1, grad_accum=accum))
        grads.append(_capture_grads(loop))
        losses.append(loop.run().rows[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(grads[0][0], grads[1][0]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * b.abs().max())
    # The test can fail: averaging per-micro-batch means (the old HF behaviour) gives other gradients.
    model = toy_model(dropout=0.0)
    from lorafuse.training.loss import lm_loss_sum

    mean_of_means = sum(lm_loss_sum(model, b) / c for b, c in zip(micro, counts)) / 3
    mean_of_means.backward()
    wrong = [p.grad for p in model.parameters() if p.requires_grad]
    assert not torch.allclose(wrong[0], grads[1][0][0], rtol=1e-3)


def test_epochs_windows_and_max_steps():
    assert total_steps(_tc(max_steps=None, epochs=2, grad_accum=2), micro_per_epoch=5) == 6
    assert total_steps(_tc(max_steps=None, epochs=0.5, grad_accum=2), micro_per_epoch=5) == 2
    assert total_steps(_tc(max_steps=4, epochs=3, grad_accum=2), micro_per_epoch=5) == 4  # max_steps wins
    batches = ToyBatches(n_micro=5)
    loop = TrainingLoop(toy_model(), batches, _tc(max_steps=None, epochs=2, grad_accum=2))
    seen = []
    real = loop.step
    loop.step = lambda b: seen.append(len(b)) or real(b)
    result = loop.run()
    assert seen == [2, 2, 1, 2, 2, 1]  # the last window of an epoch is short, never crossing into the next
    assert result.state.epoch == 2 and result.state.micro_index == 0 and result.state.step == 6


def test_cpu_runs_are_deterministic(tmp_path):
    rows = []
    for i in range(2):
        r = train_loop(toy_model(), ToyBatches(), _tc(optimizer="adamw_8bit"), out_dir=tmp_path / str(i))
        rows.append(_losses(r.rows))
    assert rows[0] == rows[1]
    assert len({loss for _, loss, _, _ in rows[0]}) > 1


def test_sigterm_saves_and_resume_is_bitwise_identical(tmp_path):
    """Dropout on (RNG matters), 8-bit optimizer (its state matters), mid-epoch stop (data position matters)."""
    tc = _tc(max_steps=8, optimizer="adamw_8bit", save_every=100, log_every=3)  # a log row spans the stop
    full = train_loop(toy_model(), ToyBatches(), tc, out_dir=tmp_path / "full")

    out = tmp_path / "interrupted"
    printed = io.StringIO()
    first = TrainingLoop(toy_model(), ToyBatches(), tc, out_dir=out, console=Console(file=printed, width=200))
    real = first.step

    def step_then_sigterm(batches):
        row = real(batches)
        if first.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; the loop must finish the step and save
        return row

    first.step = step_then_sigterm
    stopped = first.run()
    assert stopped.stop_reason == "signal" and stopped.stop_signal == "SIGTERM" and stopped.state.step == 4
    assert "stopped at step 4; checkpoint-4 saved; run the same command to resume" in printed.getvalue()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-8").exists()
    assert stopped.state.micro_index == 2  # mid-epoch: 6 micro-batches, 4 steps of 2 -> epoch 1, index 2

    fresh = toy_model()
    with torch.no_grad():  # the resume must bring the trained values back, whatever the model holds now
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    resumed = train_loop(fresh, ToyBatches(), tc, out_dir=out, resume_from=out / "checkpoint-4")
    assert resumed.stop_reason == "finished"
    assert _losses(resumed.rows) == _losses(full.rows)  # bitwise: floats compared with ==
    saved = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert _losses(saved) == _losses(full.rows)


def test_nan_step_is_skipped_then_too_many_stop_the_run(tmp_path):
    model = toy_model(dropout=0.0)
    poisoned = set()

    def poison(module, args, output):
        return output * math.nan if loop.state.step in poisoned else output

    model.model.norm.register_forward_hook(poison)
    loop = TrainingLoop(model, ToyBatches(), _tc(max_steps=12, nan_tolerance=2), out_dir=tmp_path)
    before = {}
    real = loop.step

    def watch(batches):
        before[loop.state.step] = [p.detach().clone() for p in loop.params]
        return real(batches)

    loop.step = watch
    poisoned.update({2, 5, 6, 7, 8})  # step 2 alone recovers; 5..7 is 3 in a row > tolerance 2
    with pytest.raises(LorafuseError) as err:
        loop.run()
    text = str(err.value)
    assert "NaN" in text and "train.lr" in text and "bfloat16" in text and "data" in text
    rows = loop.metrics.rows
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped == [3, 6, 7, 8]  # rows carry the step count after the step
    assert all(torch.equal(a, b) for a, b in zip(before[2], before[3]))  # no update on the poisoned step
    assert not all(torch.equal(a, b) for a, b in zip(before[3], before[4]))  # training went on after it
    assert rows[-1]["step"] == 8


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(validation, "evaluate", lambda *a, **k: {"loss": next(scripted), "units": 1})
    tc = _tc(max_steps=20, eval_every=2, early_stopping_patience=2, save_total_limit=1)
    result = train_loop(toy_model(), ToyBatches(), tc, val_batches=ToyBatches(n_micro=1), out_dir=tmp_path)
    assert result.stop_reason == "early_stopping" and result.state.step == 8
    assert result.state.best_eval == 2.0 and result.state.best_step == 4
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {"step": 4, "eval_loss": 2.0, "checkpoint": "checkpoint-4"}
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-8"]  # limit 1 keeps the newest, plus the best
    eval_rows = [r["eval_loss"] for r in result.rows if "eval_loss" in r]
    assert eval_rows == [3.0, 2.0, 2.5, 2.6]


def test_gradient_checkpointing_same_grads_and_no_reentrant_warning():
    batches = _Fixed([next(ToyBatches().epoch_batches(0))])
    grads = []
    for ckpt in (False, True):
        loop = TrainingLoop(
            toy_model(dropout=0.0), batches, _tc(max_steps=1, grad_accum=1, gradient_checkpointing=ckpt)
        )
        grads.append(_capture_grads(loop))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.run()
        assert not [w for w in caught if "use_reentrant" in str(w.message)]
    assert loop.model.model.gradient_checkpointing
    for a, b in zip(grads[0][0], grads[1][0]):
        assert b.abs().sum() > 0
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_autocast_trains_and_checkpoints_the_scaler(tmp_path, dtype):
    tc = _tc(max_steps=3, save_every=3)
    result = train_loop(toy_model(), ToyBatches(), tc, out_dir=tmp_path, compute_dtype=dtype)
    assert result.stop_reason == "finished"
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in result.rows if "loss" in r)
    blob = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert (blob["scaler"] is not None) == (dtype == torch.float16)


VOLATILE = ("tokens_per_s", "time_s", "memory_mb")


def _counters(state) -> dict:
    return {k: v for k, v in vars(state).items() if k != "train_seconds"}


def _poisoned_run(monkeypatch, read_at_once: bool, device: str, poisoned=(2, 5, 6)):
    """A run whose steps `poisoned` (0-based) have NaN losses; read_at_once: every step's values read right after it,
    as a loop with a host synchronisation each step; else the loop's own choice (most steps one step late)."""
    if read_at_once:
        monkeypatch.setattr(TrainingLoop, "_needs_values_now", lambda self, *args: True)
    model = toy_model(hidden=64).to(device)  # q_proj 64 x 64: 8-bit optimizer states; v_proj 64 x 32: fp32 states
    model.model.norm.register_forward_hook(lambda m, a, out: out * math.nan if loop.state.step in poisoned else out)
    tc = _tc(max_steps=9, optimizer="adamw_8bit", log_every=2, nan_tolerance=3)
    loop = TrainingLoop(model, ToyBatches(n_micro=8), tc)
    late, real = [], loop.step
    loop.step = lambda batches: late.append(loop._pending is not None) or real(batches)
    result = loop.run()
    monkeypatch.undo()
    rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in result.rows]
    return rows, [p.detach().clone() for p in loop.params], loop.optimizer.state_dict(), result, late


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_reading_each_step_one_step_late_changes_no_row_weight_or_state(monkeypatch, device):
    """On CUDA the late read is real (pinned copies and events behind the queued next step; the 8-bit update's flag
    in the fused kernel); attention on SDPA's math kernel there, whose backward is deterministic."""
    with sdpa_kernel(SDPBackend.MATH) if device == "cuda" else contextlib.nullcontext():
        rows, params, opt, result, late = _poisoned_run(monkeypatch, read_at_once=False, device=device)
        ref_rows, ref_params, ref_opt, ref, ref_late = _poisoned_run(monkeypatch, read_at_once=True, device=device)
    assert any(late) and not any(ref_late)  # the run read steps late; the reference read each at once
    assert rows == ref_rows and [r["step"] for r in rows if r.get("skipped")] == [3, 6, 7]
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    for i, state in ref_opt["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(opt["state"][i][k])) for k, v in state.items())
    assert _counters(result.state) == _counters(ref.state)
    times = [r["time_s"] for r in result.rows if "time_s" in r]
    assert all(b > a for a, b in zip(times, times[1:]))


def test_a_non_finite_gradient_with_a_finite_loss_skips_exactly_that_update():
    model = toy_model(dropout=0.0)
    loop = TrainingLoop(model, ToyBatches(), _tc(max_steps=5, optimizer="adamw_8bit"))
    first = next(p for p in model.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * math.inf if loop.state.step == 2 else g)  # the third step's backward
    before, real = {}, loop.step

    def watch(batches):
        before[loop.state.step] = [p.detach().clone() for p in loop.params]
        return real(batches)

    loop.step = watch
    result = loop.run()
    skipped = [r for r in result.rows if r.get("skipped")]
    assert [(r["step"], r["reason"], r["loss"]) for r in skipped] == [(3, "nan", None)]
    assert math.isfinite([r for r in result.rows if r["step"] == 2][0]["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before[2], before[3]))  # no update at the skipped step
    assert not all(torch.equal(a, b) for a, b in zip(before[3], before[4]))  # the next one updates
    assert result.state.skipped_steps == 1 and result.state.nan_streak == 0
    assert {int(s["step"]) for s in loop.optimizer.state.values()} == {4}  # 5 steps, one skipped


def test_an_error_in_a_step_still_logs_the_step_before_it():
    model = toy_model(dropout=0.0)
    loop = TrainingLoop(model, ToyBatches(), _tc(max_steps=6))

    def fail(module, args, output):
        if loop.state.step == 4:  # the fifth step; the fourth (no epoch end, no save) is read one step late
            raise RuntimeError("a broken step")
        return output

    model.model.norm.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="a broken step"):
        loop.run()
    assert [r["step"] for r in loop.metrics.rows if "loss" in r] == [1, 2, 3, 4]

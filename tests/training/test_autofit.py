"""Fitting the step into GPU memory: the OOM retry in the loop (lorafuse.training.oom) and train.auto_fit (job.run).

There is no GPU here, so an out-of-memory error is simulated: the SFT objective's loss function (`lm_loss_sum` as
objectives/sft.py calls it) runs the real forward, then raises torch.cuda.OutOfMemoryError when its micro-batch has
more rows than a "GPU" allows. The forward has already drawn its dropout masks, as a real OOM late in a step has.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console
from toy import toy_model

from lorafuse.config import TrainConfig, load_config, validate_config
from lorafuse.data.collate import Batcher
from lorafuse.errors import LorafuseError
from lorafuse.job import run
from lorafuse.plan import apply_overrides, plan, speed, suggest
from lorafuse.plan.memory import GIB
from lorafuse.training.loop import TrainingLoop
from lorafuse.training.objectives import sft as sft_mod
from lorafuse.training.oom import split_batch

_REAL_LOSS_SUM = sft_mod.lm_loss_sum


def _rows(n=14, vocab=96, seed=3):
    """Rows of different lengths (so re-split pieces must be trimmed as the Batcher pads), half masked prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 13, (), generator=g))
        ids = ((int(torch.randint(4, vocab, (), generator=g)) + torch.arange(length)) % (vocab - 4) + 4).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return rows


def _tc(mb, ga, **kw):
    return TrainConfig(
        **{
            **dict(
                max_steps=4,
                micro_batch_size=mb,
                grad_accum=ga,
                lr=5e-3,
                warmup_steps=1,
                optimizer="adamw",
                gradient_checkpointing=False,
                log_every=1,
            ),
            **kw,
        }
    )


def _flaky(monkeypatch, max_rows, from_call=1, seen=None):
    """lm_loss_sum that runs, then raises CUDA's OOM for micro-batches above `max_rows` rows (from call N on)."""
    real, calls = _REAL_LOSS_SUM, [0]

    def loss_sum(model, batch, *args):
        calls[0] += 1
        out = real(model, batch, *args)
        if seen is not None:
            seen.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})  # the forward's inputs
        if calls[0] >= from_call and batch["input_ids"].shape[0] > max_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return out

    monkeypatch.setattr(sft_mod, "lm_loss_sum", loss_sum)


def _loop(mb, ga, dropout=0.0, out_dir=None, **kw):
    batches = Batcher(_rows(), mb, pad_id=3, seed=1)
    tc, console = _tc(mb, ga, **kw), Console(file=io.StringIO(), width=250)
    return TrainingLoop(toy_model(dropout=dropout), batches, tc, out_dir=out_dir, console=console)


def _run(mb, ga, dropout=0.0, **kw):
    loop = _loop(mb, ga, dropout, **kw)
    return loop, loop.run()


def _losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


def test_oom_mid_run_resplits_the_step_and_keeps_the_math(monkeypatch):
    """An OOM at step 2 (micro-batch 4 x 2): the step is retried at 2 x 4 on the SAME rows, the run finishes, and
    every step's loss is that of a run started at 2 x 4."""
    direct_seen, resplit_seen = [], []
    _flaky(monkeypatch, max_rows=99, seen=direct_seen)
    _, direct = _run(2, 4)
    _flaky(monkeypatch, max_rows=2, from_call=3, seen=resplit_seen)  # step 1 (2 calls) fits, step 2 does not
    loop, res = _run(4, 2)
    assert res.stop_reason == "finished" and res.state.step == 4
    events = [r for r in res.rows if r.get("event") == "oom_retry"]
    assert len(events) == 1 and events[0]["step"] == 2
    order = [(r["step"], r.get("event")) for r in res.rows]  # step 1's row (read late) before step 2's retry
    assert order.index((1, None)) < order.index((2, "oom_retry")) < order.index((2, None))
    assert events[0]["from"] == {"micro_batch_size": 4, "grad_accum": 2, "gradient_checkpointing": False}
    assert (events[0]["micro_batch_size"], events[0]["grad_accum"]) == (2, 4)  # effective batch 8 kept
    assert "out of memory" in events[0]["error"]
    assert res.state.oom_overrides == {"train.micro_batch_size": 2, "train.grad_accum": 4}
    # From the failed step on, the pieces ARE the direct run's micro-batches (same rows, order and padding).
    after = resplit_seen[3:]  # 2 calls of step 1, then the failed first call of step 2
    assert len(after) == len(direct_seen) - 4
    for a, b in zip(after, direct_seen[4:]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Losses: step 1 ran one 4-row batch where the direct run ran two 2-row ones, so it and (through the
    # update) the later steps differ only in the order of fp32 additions: ~1e-7 relative per step, a few
    # steps deep. 1e-5 bounds that with room; a wrong window (the same micro-batches at half the effective
    # batch) misses it by orders of magnitude, so the bound can fail.
    tokens = [r["tokens"] for r in res.rows if "loss" in r]
    assert tokens == [r["tokens"] for r in direct.rows if "loss" in r]
    for got, want in zip(_losses(res.rows), _losses(direct.rows), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    _flaky(monkeypatch, max_rows=99)
    _, half = _run(2, 2)
    assert max(abs(a - b) / b for a, b in zip(_losses(half.rows), _losses(direct.rows))) > 1e-3


def test_oom_at_the_first_step_gives_the_smaller_run_bit_for_bit(monkeypatch):
    """With dropout on: the retry restores the RNG state the step started with, so a run that ran out of memory
    at its first step is the run started at the smaller setting, exactly."""
    _flaky(monkeypatch, max_rows=99)
    _, direct = _run(2, 4, dropout=0.1)
    _flaky(monkeypatch, max_rows=2)
    _, retried = _run(4, 2, dropout=0.1)
    assert [r["step"] for r in retried.rows if r.get("event") == "oom_retry"] == [1]
    assert _losses(retried.rows) == _losses(direct.rows)


def test_a_second_oom_stops_the_run_naming_what_was_tried(monkeypatch):
    _flaky(monkeypatch, max_rows=0, from_call=3)  # everything OOMs from step 2 on
    with pytest.raises(LorafuseError) as err:
        _run(4, 2)
    text = str(err.value)
    assert "step 2" in text and "micro_batch_size 4 x grad_accum 2" in text
    assert "again on the retry at micro_batch_size 2 x grad_accum 4" in text
    assert "lorafuse plan" in err.value.fix
    # At the floor (one row per micro-batch, checkpointing on) the first OOM already stops the run.
    _flaky(monkeypatch, max_rows=0)
    with pytest.raises(LorafuseError, match="no smaller setting") as err:
        _run(1, 4, gradient_checkpointing=True)
    assert "lorafuse plan" in err.value.fix


def test_oom_turns_checkpointing_on_through_accel_and_a_resume_keeps_it(monkeypatch, tmp_path):
    """Micro-batch 1 with checkpointing off runs out of memory: the decision is checkpointing on, which the loop
    applies by preparing the model again through lorafuse.accel. The retried run is the run started with
    checkpointing on, bit for bit (dropout on: the retry draws the step's masks again), and a resume from its
    checkpoint turns checkpointing on before its first step."""
    from lorafuse.accel import accel_state

    def loss_sum(model, batch, *args):  # "fits" only with checkpointing on
        out = _REAL_LOSS_SUM(model, batch, *args)
        if not accel_state(model).checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return out

    monkeypatch.setattr(sft_mod, "lm_loss_sum", loss_sum)
    _, started = _run(1, 2, dropout=0.1, gradient_checkpointing=True)
    loop = _loop(1, 2, dropout=0.1, out_dir=tmp_path, save_every=2)
    retried = loop.run()
    events = [r for r in retried.rows if r.get("event") == "oom_retry"]
    assert [(e["step"], e["gradient_checkpointing"], e["from"]["gradient_checkpointing"]) for e in events] == [
        (1, True, False)
    ]
    assert accel_state(loop.model).checkpointing and loop.model.model.gradient_checkpointing
    assert accel_state(loop.model).options.gradient_checkpointing is True
    assert _losses(retried.rows) == _losses(started.rows)
    resumed = _loop(1, 2, dropout=0.1, out_dir=tmp_path, save_every=2)
    assert not accel_state(resumed.model).checkpointing
    resumed.resume(tmp_path / "checkpoint-2")
    assert accel_state(resumed.model).checkpointing  # before any step: no second out-of-memory error
    assert (
        "continuing at micro_batch_size 1 x grad_accum 2, gradient checkpointing on" in resumed.console.file.getvalue()
    )


@pytest.mark.parametrize("packing,multiple", [(False, 1), (False, 8), (True, 1)])
def test_split_pieces_are_the_smaller_batchers_micro_batches(packing, multiple):
    """Padded (trimmed to the piece's longest row, rounded as the Batcher rounds) and packed (varlen fields rebuilt)."""
    common = dict(pad_id=3, seed=1, packing=packing, max_length=24 if packing else None, pad_to_multiple_of=multiple)
    rows = _rows(n=30)
    pieces = [p for b in Batcher(rows, 4, **common).epoch_batches(1) for p in split_batch(b, 2, multiple)]
    expected = list(Batcher(rows, 2, **common).epoch_batches(1))
    assert len(pieces) == len(expected) > 4
    assert any(
        p["input_ids"].shape[1] < b["input_ids"].shape[1]
        for p, b in zip(pieces[::2], Batcher(rows, 4, **common).epoch_batches(1))
    )  # trimming happened
    for got, want in zip(pieces, expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key


def test_other_errors_are_not_retried(monkeypatch):
    def broken(*args):
        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(sft_mod, "lm_loss_sum", broken)
    with pytest.raises(RuntimeError, match="CUBLAS"):
        _run(4, 2)


# ------------------------------------------------------------------------------------- through lorafuse.job.run


def _cfg(model_dir, out, **train):
    return validate_config(
        {
            "model": {"path": str(model_dir), "quant": "none", "compute_dtype": "auto"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            "data": {"path": "builtin:demo", "format": "alpaca", "max_length": 64, "num_rows": 24},
            "train": {
                "max_steps": 3,
                "micro_batch_size": 8,
                "grad_accum": 1,
                "lr": 3e-3,
                "optimizer": "adamw",
                "gradient_checkpointing": True,
                "save_every": 1,
                **train,
            },
            "output": {"dir": str(out)},
        }
    )


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=250), buf


def _fake_gpu(monkeypatch, budget_bytes):
    """The planner sees a GPU whose free memory makes `budget_bytes` its budget (plan: free + 0.5 GiB)."""
    free = budget_bytes - GIB // 2
    monkeypatch.setattr(speed, "detect_gpu", lambda: ("Fake GPU", 16 * GIB, free))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_oom_retry_in_a_run_is_logged_saved_and_kept_on_resume(tmp_path, tiny_model_dir, monkeypatch):
    """The planner's next_smaller picks the re-split (checkpointing is already on); metrics.jsonl has the
    event; a resumed run continues at the lowered setting instead of running out of memory again."""
    out = tmp_path / "run"
    _flaky(monkeypatch, max_rows=4)
    console, buf = _console()
    res = run(_cfg(tiny_model_dir, out), console=console)
    assert res.stop_reason == "finished" and res.steps == 3
    events = [r for r in _metrics(out) if r.get("event") == "oom_retry"]
    assert len(events) == 1 and (events[0]["micro_batch_size"], events[0]["grad_accum"]) == (4, 2)
    assert "step 1: out of GPU memory at micro_batch_size 8 x grad_accum 1" in buf.getvalue()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["oom_overrides"] == {"train.micro_batch_size": 4, "train.grad_accum": 2}
    assert load_config(out / "config.yaml").train.micro_batch_size == 8  # what was asked: the resume check
    more = run(_cfg(tiny_model_dir, out, max_steps=5), console=console)
    assert more.steps == 5 and "continuing at micro_batch_size 4 x grad_accum 2" in buf.getvalue()
    assert len([r for r in _metrics(out) if r.get("event") == "oom_retry"]) == 1


def test_auto_fit_applies_the_planner_suggestion_and_saves_it(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path / "run", auto_fit=True, gradient_checkpointing=False, device="auto")
    big = plan(cfg, gpu_memory=16 * GIB).estimate.peak
    one = plan(
        apply_overrides(
            cfg, {"train.micro_batch_size": 1, "train.grad_accum": 8, "train.gradient_checkpointing": True}
        ),
        gpu_memory=16 * GIB,
    ).estimate.peak
    budget = (big + one) // 2  # the config as written does not fit; the smallest setting does
    _fake_gpu(monkeypatch, budget)
    expected = suggest(cfg, gpu_memory=None)
    assert expected and "data.max_length" not in expected
    console, buf = _console()
    res = run(cfg, console=console)
    assert res.stop_reason == "finished"
    fitted = apply_overrides(cfg, expected)
    assert fitted.train.micro_batch_size * fitted.train.grad_accum == 8  # the effective batch is kept
    assert plan(fitted).estimate.peak <= budget
    line = next(x for x in buf.getvalue().splitlines() if x.startswith("auto_fit: "))
    for key, value in expected.items():
        assert (
            f"{key} {json.dumps(cfg.model_dump(mode='json')[key.split('.')[0]][key.split('.')[1]])} -> "
            f"{json.dumps(value)}" in line
        )
    assert f"of {budget / GIB:.1f} GiB" in line and "predicted peak" in line
    for saved in (tmp_path / "run" / "config.yaml", res.last_checkpoint / "config.yaml"):
        assert load_config(saved) == fitted


def test_auto_fit_resume_reaches_the_same_values(tmp_path, tiny_model_dir, monkeypatch):
    """A resumed auto-fit run keeps its checkpoint's micro-batches even where this GPU's fit differs (the data
    position is counted in them); the resume check then compares fitted with fitted and passes."""
    cfg = _cfg(tiny_model_dir, tmp_path / "run", auto_fit=True, device="auto", max_steps=2)
    tight = plan(apply_overrides(cfg, {"train.micro_batch_size": 2, "train.grad_accum": 4}), gpu_memory=GIB)
    _fake_gpu(monkeypatch, tight.estimate.peak)
    first = run(cfg, console=_console()[0])
    fitted = load_config(tmp_path / "run" / "config.yaml")
    assert fitted.train.micro_batch_size < 8 and first.steps == 2
    _fake_gpu(monkeypatch, 16 * GIB)  # now everything fits: a fresh fit would keep micro-batch 8
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})})
    assert "train.micro_batch_size" not in suggest(longer)
    console, buf = _console()
    again = run(longer, console=console)
    assert again.steps == 4 and "micro-batches kept from the checkpoint" in buf.getvalue()
    now = load_config(tmp_path / "run" / "config.yaml")
    assert now.train == fitted.train.model_copy(update={"max_steps": 4})


def test_auto_fit_without_a_gpu_says_so_and_changes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(speed, "detect_gpu", lambda: None)
    cfg = _cfg(tiny_model_dir, tmp_path / "run", auto_fit=True, device="auto", max_steps=1)
    console, buf = _console()
    run(cfg, console=console)
    assert "auto_fit: no CUDA GPU to fit the run to; training with the config as written" in buf.getvalue()
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert not math.isnan(_metrics(tmp_path / "run")[0]["loss"])

"""`run(cfg)` and `train(model, tokenizer, data)`: output checks, resume decisions, the Python API."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from lorafuse import job
from lorafuse.config import validate_config
from lorafuse.errors import LorafuseError
from lorafuse.job import run, train


def _cfg(model_dir, out, **train):
    return validate_config(
        {
            "model": {"path": str(model_dir), "quant": "none", "compute_dtype": "auto"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            "data": {"path": "builtin:demo", "format": "alpaca", "max_length": 64, "num_rows": 24},
            "train": {
                "max_steps": 2,
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 3e-3,
                "optimizer": "adamw",
                "gradient_checkpointing": False,
                "device": "cpu",
                **train,
            },
            "output": {"dir": str(out)},
        }
    )


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def test_unwritable_output_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorafuseError, match="not writable"):
        run(_cfg(tmp_path, tmp_path / "file" / "run"))


def test_resume_refuses_a_changed_config_then_force_and_start_over(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    console, buf = _console()
    first = run(_cfg(tiny_model_dir, out), console=console)
    assert first.stop_reason == "finished" and first.steps == 2 and first.compute_dtype == "float32"
    assert "compute dtype: float32 (auto: CPU)" in buf.getvalue()
    assert (out / "adapter" / "adapter_config.json").is_file()
    # what ran, in the result and in summary.json: on a CPU the PyTorch path, eager
    ran = {"fast_path": False, "fused_loss": False, "cuda_graph_replays": 0}
    assert first.speedups == ran and json.loads((out / "summary.json").read_text())["speedups"] == ran

    longer = _cfg(tiny_model_dir, out, max_steps=4, lr=1e-3)  # max_steps may change; lr may not
    with pytest.raises(LorafuseError) as err:
        run(longer, console=console)
    assert "train.lr: 0.003 -> 0.001" in str(err.value) and "max_steps" not in str(err.value)
    assert "--force" in err.value.fix and "--no-resume" in err.value.fix

    forced = run(longer, force=True, console=console)
    assert forced.steps == 4 and forced.stop_reason == "finished"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    summary = (out / "summary.json").read_bytes()
    again = run(longer, force=True, console=console)  # the same command once more: nothing left to do
    assert again.stop_reason == "already_complete" and again.steps == 4
    assert (
        "already complete: finished at step 4 of 4" in buf.getvalue() and (out / "summary.json").read_bytes() == summary
    )

    fresh = run(_cfg(tiny_model_dir, out), resume=None, console=console)
    assert fresh.steps == 2
    archives = [p for p in out.iterdir() if p.name.startswith("archive-")]
    assert len(archives) == 1 and (archives[0] / "checkpoint-4").is_dir()
    moved = ", ".join(sorted(p.name for p in archives[0].iterdir()))  # the epoch-end checkpoints depend on the rows
    assert moved.startswith("adapter, checkpoint-2, ") and "checkpoint-4, config.yaml" in moved
    assert f"starting over: the earlier run's {moved} moved to {archives[0]}" in buf.getvalue()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_python_api_trains_a_loaded_model_on_rows(tmp_path, tiny_model_dir):
    import lorafuse

    model, tok = lorafuse.load_model(str(tiny_model_dir), quant="nf4", compute_dtype="float32", device="cpu")
    lorafuse.apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    rows = [
        {"instruction": f"Count to {n}.", "input": "", "output": " ".join(str(i) for i in range(1, n + 1))}
        for n in range(2, 18)
    ]
    console, _ = _console()
    result = lorafuse.train(
        model,
        tok,
        rows,
        output_dir=tmp_path / "out",
        max_steps=12,
        lr=1e-2,
        micro_batch_size=4,
        grad_accum=1,
        max_length=64,
        optimizer="adamw_8bit",
        console=console,
    )
    assert result.stop_reason == "finished" and result.steps == 12
    assert result.last_loss < result.first_loss
    cfg = (tmp_path / "out" / "config.yaml").read_text()
    assert "quant: nf4" in cfg and "train_rows.jsonl" in cfg
    with pytest.raises(LorafuseError, match="unknown setting 'learning_rate'") as err:
        train(model, tok, rows, output_dir=tmp_path / "out2", learning_rate=1e-3)
    assert "lr" in err.value.fix


def test_compute_dtype_choice_is_said_and_bf16_on_a_t4_is_refused(monkeypatch):
    import torch

    from lorafuse.job import _announce_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    console, buf = _console()
    assert _announce_dtype("auto", torch.device("cuda"), console) == torch.float16
    assert "compute dtype: float16 (auto: this GPU has no bf16" in buf.getvalue()
    with pytest.raises(LorafuseError, match="Tesla T4") as err:
        _announce_dtype("bfloat16", torch.device("cuda"), console)
    assert "float16" in err.value.fix


def test_the_model_is_prepared_for_the_loop_only(tmp_path, tiny_model_dir, monkeypatch):
    """The run's Options reach the loop's model (train.fp8 here, on a CPU pretending to be an FP8 card, where the
    reference ops ignore it), and the job restores the model before the adapter is written and anything else in the
    process runs."""
    from lorafuse import accel
    from lorafuse.plan import policy
    from lorafuse.training.loop import TrainingLoop

    monkeypatch.setattr(policy, "fp8_blocker", lambda *args: "")
    seen = []
    loop_run = TrainingLoop.run
    monkeypatch.setattr(
        TrainingLoop,
        "run",
        lambda self: seen.append(accel.accel_state(self.model).options.kernel.fp8) or loop_run(self),
    )
    saved, save = [], job.save_adapter
    monkeypatch.setattr(
        job,
        "save_adapter",
        lambda model, *a, **k: saved.append(accel.accel_state(model)) or save(model, *a, **k),
    )
    cfg = _cfg(tiny_model_dir, tmp_path / "run", fp8=True)
    cfg.model.compute_dtype = "bfloat16"
    console, _ = _console()
    assert run(cfg, console=console).stop_reason == "finished"
    assert seen == [True] and saved[-1] is None, "the final adapter is written from the restored model"


@pytest.mark.parametrize(
    "fast_path, why", [("off", "train.fast_path is off"), ("auto", "the fused kernels need a CUDA GPU")]
)
def test_fp8_without_the_fast_path_stops_with_the_reason_and_the_fix(
    tmp_path, tiny_model_dir, monkeypatch, fast_path, why
):
    """FP8 lives in the fused kernels: a run where they are not in place (switched off, or a CPU model here, on a
    card that could run FP8) would change nothing and look like FP8, so it stops before the first step."""
    from lorafuse import accel
    from lorafuse.errors import LorafuseError

    monkeypatch.setattr(accel, "_card", lambda device: ((9, 0), "an FP8 card"))
    cfg = _cfg(tiny_model_dir, tmp_path / "run", fp8=True)
    cfg.model.compute_dtype = "bfloat16"
    cfg.train.fast_path = fast_path
    console, _ = _console()
    with pytest.raises(LorafuseError) as err:
        run(cfg, console=console)
    assert why in str(err.value) and "FP8 runs inside the fused kernels" in str(err.value)
    assert "train.fp8: false" in err.value.fix and "train.fast_path: auto" in err.value.fix
    assert not (tmp_path / "run" / "adapter").exists()

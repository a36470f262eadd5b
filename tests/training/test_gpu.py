"""CUDA paths: bf16 autocast, fp16 + GradScaler, paged 8-bit states, the fused loss kernel, the fast path."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from lorafuse.config import validate_config
from lorafuse.job import run

pytestmark = pytest.mark.gpu


def _cfg(model_dir, out, dtype, **train):
    return validate_config(
        {
            "model": {"path": str(model_dir), "quant": "nf4", "compute_dtype": dtype},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"},
            "data": {"path": "builtin:demo", "format": "alpaca", "max_length": 96, "num_rows": 96, "val_size": 8},
            "train": {
                "max_steps": 16,
                "micro_batch_size": 4,
                "grad_accum": 2,
                "lr": 5e-3,
                "warmup_steps": 2,
                "optimizer": "paged_adamw_8bit",
                "device": "cuda",
                "eval_every": 8,
                "save_every": 8,
                **train,
            },
            "output": {"dir": str(out)},
        }
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_qlora_trains_on_cuda(tmp_path, tiny_model_dir, dtype):
    buf = io.StringIO()
    result = run(_cfg(tiny_model_dir, tmp_path / dtype, dtype), console=Console(file=buf, width=200))
    assert result.compute_dtype == dtype and result.stop_reason == "finished"
    assert result.last_loss < result.first_loss
    assert result.peak_memory_bytes > 0
    blob = torch.load(tmp_path / dtype / "checkpoint-16" / "optimizer.pt", weights_only=True)
    assert (blob["scaler"] is not None) == (dtype == "float16")
    rows = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [8, 16]


def test_fused_loss_kernel_matches_the_chunked_pass(tiny_model_dir):
    import lorafuse
    from lorafuse.accel.host_tables import simple_head
    from lorafuse.training.loss import lm_loss_sum

    model, tok = lorafuse.load_model(str(tiny_model_dir), quant="none", compute_dtype="bfloat16", device="cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (4, 64), generator=g).cuda()
    labels = ids.clone()
    labels[:, :20] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    head = simple_head(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = lm_loss_sum(model, batch, head, fused=True)
        ours = lm_loss_sum(model, batch, head, fused=False)
        hf = model(**batch).loss.float() * (labels[:, 1:] != -100).sum()
        hidden = model.base_model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    exact = torch.nn.functional.cross_entropy(
        hidden.flatten(0, 1).double() @ head.weight.double().t(), shifted, ignore_index=-100, reduction="sum"
    )
    assert fused.dtype == ours.dtype == torch.float32
    # Against the fp64 loss of the same hidden states: no worse than 2x HF's own bf16 loss.
    for value in (fused, ours):
        assert (value.double() - exact).abs() <= 2 * (hf.double() - exact).abs()


def _graph_run(model_dir, out, graphs: str, dtype: str = "bfloat16", packing: bool = True, dropout: float = 0.0):
    buf = io.StringIO()
    cfg = validate_config(
        {
            "model": {"path": str(model_dir), "quant": "nf4", "compute_dtype": dtype},
            "lora": {"r": 8, "alpha": 16, "dropout": dropout, "targets": "all-linear"},
            "data": {
                "path": "builtin:demo",
                "format": "alpaca",
                "max_length": 96,
                "num_rows": 96,
                "val_size": 8,
                "packing": packing,
            },
            "train": {
                "max_steps": 12,
                "micro_batch_size": 4,
                "grad_accum": 2,
                "lr": 5e-3,
                "warmup_steps": 2,
                "optimizer": "paged_adamw_8bit",
                "device": "cuda",
                "eval_every": 6,
                "save_every": 6,
                "log_every": 1,
                "cuda_graphs": graphs,
                "fast_path": "on",
            },
            "output": {"dir": str(out)},
        }
    )
    result = run(cfg, console=Console(file=buf, width=200))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, [r["loss"] for r in rows if "eval_loss" not in r and r.get("loss") is not None], buf.getvalue()


@pytest.mark.parametrize("packing,dropout", [(True, 0.0), (False, 0.05)])
def test_training_loop_replays_cuda_graphs_and_matches_eager(tmp_path, tiny_model_dir, packing, dropout):
    """The loop captures forward + backward and replays it, with packed rows, and with padded rows (rounded to
    a multiple of 64: a few shapes) and the seed's LoRA dropout (device-side seeds: the same masks as eager);
    the per-step losses match the same run without graphs within the bf16 reference's own distance from fp32
    (the graph's loss takes the fixed-shape pass, so bit equality is not promised here)."""
    kw = {"packing": packing, "dropout": dropout}
    graphed, g_losses, log = _graph_run(tiny_model_dir, tmp_path / "graphs", "auto", **kw)
    assert "CUDA graphs on" in log, log[-2000:]
    assert graphed.stop_reason == "finished" and len(g_losses) == 12
    assert graphed.speedups["fast_path"] and graphed.speedups["cuda_graph_replays"] > 0
    eager, e_losses, e_log = _graph_run(tiny_model_dir, tmp_path / "eager", "off", **kw)
    assert "CUDA graphs on" not in e_log and eager.speedups["cuda_graph_replays"] == 0
    _, f_losses, _ = _graph_run(tiny_model_dir, tmp_path / "fp32", "off", dtype="float32", **kw)
    noise = max(abs(a - b) for a, b in zip(e_losses, f_losses))
    assert max(abs(a - b) for a, b in zip(g_losses, e_losses)) <= noise


def _dpo_run(model_dir, out, graphs: str, dtype: str = "bfloat16", reference: str = "live"):
    buf = io.StringIO()
    cfg = validate_config(
        {
            "model": {"path": str(model_dir), "quant": "nf4", "compute_dtype": dtype},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"},
            "data": {"path": "builtin:preference", "format": "preference", "max_length": 128, "val_size": 4},
            "train": {
                "objective": "dpo",
                "dpo_reference": reference,
                "max_steps": 8,
                "micro_batch_size": 2,
                "grad_accum": 2,
                "lr": 5e-3,
                "warmup_steps": 1,
                "device": "cuda",
                "log_every": 1,
                "cuda_graphs": graphs,
                "fast_path": "on",
            },
            "output": {"dir": str(out)},
        }
    )
    result = run(cfg, console=Console(file=buf, width=200))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in rows if r.get("loss") is not None and "eval_loss" not in r], buf.getvalue()


@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_dpo_run_replays_cuda_graphs_and_matches_eager(tmp_path, tiny_model_dir, reference):
    """A DPO run's micro-step (reference pass, policy pass, pair loss) is captured and replayed by the loop; its
    per-step losses and rewards match the same run without graphs within the bf16 run's own distance from fp32
    (the graph's log-probs take the fixed-shape pass: not bit-equal)."""
    graphed, g_rows, log = _dpo_run(tiny_model_dir, tmp_path / "graphs", "auto", reference=reference)
    assert "CUDA graphs on" in log, log[-2000:]
    assert graphed.stop_reason == "finished" and len(g_rows) == 8
    _, e_rows, e_log = _dpo_run(tiny_model_dir, tmp_path / "eager", "off", reference=reference)
    assert "CUDA graphs on" not in e_log
    _, f_rows, _ = _dpo_run(tiny_model_dir, tmp_path / "fp32", "off", dtype="float32", reference=reference)
    for key in ("loss", "rewards/margin", "logps/chosen"):
        noise = max(abs(e[key] - f[key]) for e, f in zip(e_rows, f_rows))
        assert max(abs(g[key] - e[key]) for g, e in zip(g_rows, e_rows)) <= max(noise, 1e-6), key
    assert len({round(r["rewards/margin"], 6) for r in g_rows}) > 4, "the replayed steps log their own rewards"

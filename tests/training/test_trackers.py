"""train.report_to: each tracker's own files, read back with its own reader, hold exactly metrics.jsonl's rows.

TensorBoard event files are read with tensorboard's EventAccumulator (values are float32 there), the offline
wandb run with `wandb leet inspect --json` (wandb's reader of its .wandb log), the MLflow store with MlflowClient.
A resume from an earlier checkpoint replays steps the trackers already got: none may appear twice.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

from lorafuse.cli import main
from lorafuse.config import validate_config
from lorafuse.errors import ConfigError
from lorafuse.job import run
from lorafuse.training import trackers


def _cfg(model_dir, out, **train):
    return validate_config(
        {
            "model": {"path": str(model_dir), "quant": "none", "compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            "data": {"path": "builtin:demo", "format": "alpaca", "max_length": 64, "num_rows": 40, "val_size": 8},
            "train": {
                "max_steps": 6,
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 3e-3,
                "optimizer": "adamw",
                "gradient_checkpointing": False,
                "device": "cpu",
                "save_every": 2,
                "eval_every": 2,
                **train,
            },
            "output": {"dir": str(out)},
        }
    )


def test_a_missing_tracker_package_stops_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import lorafuse.model.load as load

    monkeypatch.setattr(trackers, "_installed", lambda module: module != "wandb")
    with pytest.raises(ConfigError) as err:
        trackers.require_trackers(["tensorboard", "wandb"])
    assert "wandb" in err.value.problem and "tensorboard" not in err.value.problem
    assert "pip install 'lorafuse[wandb]'" in err.value.fix

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", f"output.dir={tmp_path / 'run'}", "train.report_to=[wandb]"]) == 2
    assert "pip install 'lorafuse[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_report_to_rejects_an_unknown_tracker():
    with pytest.raises(ConfigError, match="train.report_to"):
        validate_config({"model": {"path": "m"}, "data": {"path": "d"}, "train": {"report_to": ["comet"]}})


MEASURED = {"train/tokens_per_s", "train/memory_mb", "train/time_s"}


def _expected(out) -> dict[tuple[str, int], float]:
    """{("train/loss", 3): 2.71, ...} from metrics.jsonl, named as the trackers name them."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for row in rows:
        kind = "eval" if "eval_loss" in row else "train"
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected[(f"{kind}/{key.removeprefix('eval_')}", row["step"])] = value
    return expected


def _tensorboard(out, run_id) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / run_id))
    acc.Reload()
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    lora:\n      r: 4\n" in config_text  # the resolved config, as an indented (code) block
    return [(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


def _wandb(out, run_id) -> tuple[list[tuple[str, int, float]], dict]:
    logged, config = [], {}
    files = sorted(out.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(files) == 2  # the first run and its resume, under one id
    for path in files:
        text = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", str(path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for record in map(json.loads, text.splitlines()):
            if record.get("type") == "history":
                item = record["history"]["item"]
                logged += [(k, item["_step"], v) for k, v in item.items() if not k.startswith("_")]
            if record.get("type") == "run" and "config" in record["run"]:
                config.update(record["run"]["config"]["update"])
    return logged, config


def _mlflow(out, run_id) -> tuple[list[tuple[str, int, float]], object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    found = client.get_run(run_id)
    logged = [(k, m.step, m.value) for k in found.data.metrics for m in client.get_metric_history(run_id, k)]
    return logged, found


@pytest.mark.slow
def test_trackers_hold_the_metrics_rows_once_across_a_replayed_resume(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written to the home folder
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, out, report_to=["tensorboard", "wandb", "mlflow"])
    console = Console(file=io.StringIO())
    assert run(cfg, console=console).stop_reason == "finished"
    ids = json.loads((out / "trackers.json").read_text())
    # As after a crash past checkpoint-4: steps 5-6 (and the eval at 6) reach the trackers a second time.
    assert run(cfg, resume=str(out / "checkpoint-4"), console=console).stop_reason == "finished"
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same tracker runs, continued

    expected = _expected(out)
    assert {step for _, step in expected} == {1, 2, 3, 4, 5, 6}
    assert {("eval/loss", s) for s in (2, 4, 6)} <= set(expected)
    assert {("train/grad_norm", 6), ("train/tokens_per_s", 6), ("train/memory_mb", 6)} <= set(expected)

    tb = _tensorboard(out, ids["tensorboard"])
    wb, wb_config = _wandb(out, ids["wandb"])
    ml, ml_run = _mlflow(out, ids["mlflow"])
    for name, logged in (("tensorboard", tb), ("wandb", wb), ("mlflow", ml)):
        keys = [(tag, step) for tag, step, _ in logged]
        assert len(keys) == len(set(keys)), f"{name} logged a step twice"
        assert set(keys) == set(expected), name
    # The trackers keep what they got first: the replayed steps' loss, lr, grad norm and eval equal it bit for bit
    # (exact resume on a CPU), their timings and memory readings are new measurements.
    kept = {k: v for k, v in expected.items() if k[1] <= 4 or k[0] not in MEASURED}
    assert len(kept) > len(expected) // 2
    assert all(np.float32(kept[(t, s)]) == np.float32(v) for t, s, v in tb if (t, s) in kept)  # float32 in TB
    assert all(kept[(t, s)] == v for t, s, v in wb + ml if (t, s) in kept)
    assert wb_config["lora"]["r"] == 4 and wb_config["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert ml_run.data.params["lora.r"] == "4" and ml_run.info.status == "FINISHED"


class _Recorder:
    """A tracker that keeps what it is sent (one class per name, so runs can be told apart)."""

    runs: dict = {}

    def start(self, config, out_dir, run_id):
        self.run_id = run_id or f"{self.name}-{len(self.runs) + 1}"
        self.runs.setdefault(self.run_id, {"logged": [], "status": None})
        return self.run_id

    def log(self, values, step):
        self.runs[self.run_id]["logged"].append((step, values))

    def finish(self, status):
        self.runs[self.run_id]["status"] = status


def _recorders(monkeypatch):
    runs: dict = {}
    made = {n: type(n, (_Recorder,), {"name": n, "runs": runs}) for n in ("tensorboard", "wandb")}
    monkeypatch.setattr(trackers, "ADAPTERS", made)
    monkeypatch.setattr(trackers, "_installed", lambda module: True)
    return runs


def test_resume_skips_steps_a_tracker_has_and_backfills_a_new_tracker(tmp_path, monkeypatch):
    from lorafuse.training.metrics import MetricsLog

    runs = _recorders(monkeypatch)
    rows = [
        {"step": 1, "loss": 3.0, "lr": 0.1, "skipped": False},
        {"step": 2, "loss": 2.0, "lr": 0.2},
        {"step": 2, "eval_loss": 2.5, "eval_ppl": 12.2},
        {"step": 3, "loss": 1.5, "lr": 0.3},
    ]
    log = MetricsLog(tmp_path, report_to=["tensorboard"])
    log.start_fresh()
    for row in rows:
        log.append(row)  # the process dies here: the checkpoint was at step 2 (before its eval)
    checkpoint = "".join(json.dumps(r) + "\n" for r in rows[:2])

    log = MetricsLog(tmp_path, report_to=["tensorboard", "wandb"])  # resumed, with a tracker added
    log.restore(checkpoint)
    for row in rows[2:] + [{"step": 4, "loss": 1.0, "lr": 0.4}]:
        log.append(row)
    log.close("signal")

    tb = runs["tensorboard-1"]
    assert [s for s, _ in tb["logged"]] == [1, 2, 2, 3, 4]  # steps 2 (eval) and 3 came once, before the crash
    assert tb["logged"][0][1] == {"train/loss": 3.0, "train/lr": 0.1}  # flags are not scalars
    assert tb["logged"][2][1] == {"eval/loss": 2.5, "eval/ppl": 12.2}
    wb = runs["wandb-2"]  # new on resume: the checkpoint's rows first, then the run goes on
    assert [s for s, _ in wb["logged"]] == [1, 2, 2, 3, 4] and wb["status"] == "stopped"
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"tensorboard": "tensorboard-1", "wandb": "wandb-2"}

    log = MetricsLog(tmp_path, report_to=["tensorboard"])  # a fresh start opens a new tracker run
    log.start_fresh()
    log.close(None)
    assert runs["tensorboard-3"]["status"] == "failed"

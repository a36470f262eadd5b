"""Experiment trackers (`train.report_to`): the metrics.jsonl rows, sent through each tracker's own library.

Every row the loop appends to metrics.jsonl goes to each tracker at the row's optimizer step, as scalars named
`train/<key>` (loss, lr, grad_norm, tokens, tokens_per_s, memory_mb, epoch, time_s) or, for an evaluation row,
`eval/<key>` without the `eval_` prefix (eval/loss, eval/ppl, eval/epoch); null values and flags are left out.
The resolved RunConfig goes along once per tracker run. Only the process that writes the run folder (rank 0)
has trackers: they live in lorafuse.training.metrics.MetricsLog, which other ranks create without a folder.

    tensorboard  torch.utils.tensorboard event files in <output.dir>/tensorboard/<run>/ (the config as a text
                 summary; `tensorboard --logdir <output.dir>/tensorboard`)
    wandb        offline in <output.dir>/wandb unless WANDB_MODE is set (`wandb sync` uploads it later);
                 project WANDB_PROJECT or "lorafuse", the config as the run's config
    mlflow       MLFLOW_TRACKING_URI if set, else a local store in <output.dir>/mlruns: an SQLite database
                 (mlruns/mlflow.db; MLflow 3 refuses the plain file store by default) and artifacts/;
                 experiment MLFLOW_EXPERIMENT_NAME or "lorafuse"; the config as params and config.yaml

Resume: <output.dir>/trackers.json keeps each tracker's run id (the TensorBoard folder, the wandb id, the
MLflow run id), so a resumed run continues the same tracker run. Rows written after the checkpoint and before
a crash were already sent: the step of the last row of each kind (train, eval) in the metrics.jsonl found on
disk at resume time, before the checkpoint's copy replaces it, bounds what is sent again, so no step is logged
twice. A tracker that a resumed run adds gets the checkpoint's earlier rows first. A fresh start (no checkpoint
or --no-resume) archives trackers.json and the tracker folders with the rest of the earlier run
(lorafuse.training.checkpoint.RUN_FILES) and opens new tracker runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from lorafuse.errors import ConfigError

STATE_FILE = "trackers.json"
# report_to name -> (module that must be importable, pip package)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require_trackers(names) -> None:
    """Raise one ConfigError naming the pip command when a tracker in `names` is not installed."""
    missing = [n for n in names if not _installed(PACKAGES[n][0])]
    if missing:
        extras = ",".join(missing)
        packages = " ".join(PACKAGES[n][1] for n in missing)
        raise ConfigError(
            f"train.report_to lists {', '.join(missing)}, but the {packages} package"
            f"{'s are' if len(missing) > 1 else ' is'} not installed",
            f"pip install 'lorafuse[{extras}]' (or pip install {packages}), or remove "
            f"{' and '.join(missing)} from train.report_to",
        )


def row_kind(row: dict) -> str:
    return "eval" if "eval_loss" in row else "train"


def scalars(row: dict) -> dict[str, float]:
    """{"train/loss": 2.31, "train/lr": 0.0002, ...} for one metrics row (module docstring)."""
    kind = row_kind(row)
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"{kind}/{key.removeprefix('eval_')}"] = float(value)
    return out


def _config_yaml(config) -> str:
    from lorafuse.config import config_to_yaml

    return config_to_yaml(config) if config is not None else ""


class TensorBoardTracker:
    """Scalars into `<out>/tensorboard/<run id>` event files; the run id names the folder."""

    name = "tensorboard"

    def start(self, config, out_dir: Path, run_id: str | None) -> str:
        from torch.utils.tensorboard import SummaryWriter

        run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S")
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard" / run_id))
        if config is not None:  # indented: TensorBoard renders text summaries as Markdown
            text = "".join(f"    {line}\n" for line in _config_yaml(config).splitlines())
            self.writer.add_text("config", text)
        return run_id

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # the resume's no-double-logging bound assumes what was logged is on disk

    def finish(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run, offline in `<out>/wandb` unless the user set WANDB_MODE; resumed by id."""

    name = "wandb"

    def start(self, config, out_dir: Path, run_id: str | None) -> str:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lorafuse"),
            name=Path(out_dir).name,
            dir=str(out_dir),
            id=run_id,
            resume="allow" if run_id else None,
            config=config.model_dump(mode="json") if config is not None else None,
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            reinit="create_new",
            settings=wandb.Settings(console="off"),  # the progress display stays ours; metrics go through log()
        )
        return self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


class MlflowTracker:
    """An MLflow run through MlflowClient (no global tracking state); resumed by run id."""

    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def start(self, config, out_dir: Path, run_id: str | None) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = None if uri else Path(out_dir).resolve() / "mlruns"
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{local / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            except MlflowException:  # another store now (MLFLOW_TRACKING_URI changed): a new run there
                pass
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorafuse")
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # a server picks its own artifact store; the local one keeps artifacts beside the database
            exp_id = self.client.create_experiment(
                name, artifact_location=None if local is None else (local / "artifacts").as_uri()
            )
        self.run_id = self.client.create_run(exp_id, run_name=Path(out_dir).name).info.run_id
        if config is not None:
            self._log_config(config)
        return self.run_id

    def _log_config(self, config) -> None:
        from mlflow.entities import Param

        from lorafuse.config import flatten

        # Params are capped at 500 characters on older servers; config.yaml holds every value in full.
        params = [Param(k, json.dumps(v, ensure_ascii=False)[:500]) for k, v in flatten(config).items()]
        self.client.log_batch(self.run_id, params=params)
        self.client.log_text(self.run_id, _config_yaml(config), "config.yaml")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self._STATUS[status])


ADAPTERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def _last_steps(rows: list[dict]) -> dict[str, int]:
    last: dict[str, int] = {}
    for row in rows:
        kind = row_kind(row)
        last[kind] = max(last.get(kind, 0), int(row.get("step", 0)))
    return last


class Trackers:
    """The trackers of one run folder: started by MetricsLog at the run's start or resume, fed every row."""

    def __init__(self, names, config, out_dir: Path):
        require_trackers(names)
        self.config, self.out_dir = config, Path(out_dir)
        self.adapters = [ADAPTERS[n]() for n in dict.fromkeys(names)]
        self.sent: dict[str, dict[str, int]] = {}  # tracker -> kind -> last step it already has
        self.started = False

    def start(self, history: list[dict], logged: list[dict] | None) -> None:
        """Open each tracker's run. `logged`: the rows on disk before a resume (None: a fresh start);
        `history`: the checkpoint's rows, sent to a tracker that has no run to continue."""
        path = self.out_dir / STATE_FILE
        saved = json.loads(path.read_text(encoding="utf-8")) if logged is not None and path.is_file() else {}
        ids = {}
        for tracker in self.adapters:
            ids[tracker.name] = tracker.start(self.config, self.out_dir, saved.get(tracker.name))
            if tracker.name in saved:
                self.sent[tracker.name] = _last_steps(logged or [])
            else:
                self.sent[tracker.name] = {}
                for row in history:
                    tracker.log(scalars(row), int(row["step"]))
        from lorafuse.atomic import write_atomic

        write_atomic(path, json.dumps(ids, indent=1))
        self.started = True

    def log(self, row: dict) -> None:
        kind, step = row_kind(row), int(row["step"])
        values = scalars(row)
        for tracker in self.adapters:
            if values and step > self.sent[tracker.name].get(kind, 0):
                tracker.log(values, step)

    def finish(self, stop_reason: str | None) -> None:
        """stop_reason: the loop's (None when it raised)."""
        if not self.started:
            return
        status = "failed" if stop_reason is None else "stopped" if stop_reason == "signal" else "finished"
        for tracker in self.adapters:
            tracker.finish(status)
        self.started = False

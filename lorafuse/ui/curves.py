"""The curves screen's data: metric series of several runs read from their metrics.jsonl, and config diffs.

series(folders, key) -> rows {"run", "step", "value"} (long form: one line per run when plotted with the run as
the colour) for key in CURVES: the train loss, the eval loss, the learning rate and tokens/s. A row without the
key (an eval row for "loss", a skipped step's null loss) gives no point. The file is re-read at each poll; a last
line still being written is skipped until it is whole.

diff(a, b): lorafuse.config.config_diff of the two runs' config.yaml over every key ("train.lr: 0.0002 -> 0.0003").
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafuse.config import config_diff, load_config
from lorafuse.errors import LorafuseError

CURVES = {
    "loss": "train loss",
    "eval_loss": "eval loss",
    "lr": "learning rate",
    "tokens_per_s": "tokens/s",
}


def read_rows(folder: Path) -> list[dict]:
    try:
        text = (Path(folder) / "metrics.jsonl").read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def series(folders: dict[str, Path], key: str) -> list[dict]:
    """Points {"run", "step", "value"} of metric `key` for each named run folder."""
    points = []
    for name, folder in folders.items():
        for row in read_rows(folder):
            if row.get(key) is not None:
                points.append({"run": name, "step": row["step"], "value": row[key]})
    return points


def latest_table(folders: dict[str, Path]) -> list[list]:
    """[[run, step, loss, eval loss, lr, tokens/s], ...]: each run's newest value of each curve."""
    table = []
    for name, folder in folders.items():
        newest: dict = {}
        for row in read_rows(folder):
            newest.update({k: row[k] for k in CURVES if row.get(k) is not None})
            if row.get("loss") is not None:
                newest["step"] = row["step"]
        table.append([name, newest.get("step")] + [newest.get(k) for k in CURVES])
    return table


def diff(a: Path, b: Path) -> str:
    """The keys whose values differ between two runs' config.yaml, one "key: a -> b" line each."""
    try:
        lines = config_diff(load_config(Path(a) / "config.yaml"), load_config(Path(b) / "config.yaml"), ignore=())
    except LorafuseError as err:
        return f"error: {err.problem}"
    return "\n".join(lines) if lines else "the two configs are the same"

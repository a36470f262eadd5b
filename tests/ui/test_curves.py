"""The curves screen's data: points per run from metrics.jsonl (live, partly written), newest values, config diff."""

from __future__ import annotations

import json

from lorafuse.config import demo_config, save_config
from lorafuse.ui.curves import diff, latest_table, series


def _metrics(folder, rows, tail: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_series_of_several_runs_skip_missing_values_and_a_torn_last_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _metrics(
        a,
        [
            {"step": 1, "loss": 3.0, "lr": 1e-4, "tokens_per_s": 100.0},
            {"step": 2, "loss": None, "lr": 2e-4, "skipped": True},
            {"step": 2, "eval_loss": 2.9, "eval_ppl": 18.2},
            {"step": 3, "loss": 2.5, "lr": 3e-4, "tokens_per_s": 120.0},
        ],
        tail='{"step": 4, "loss": 2.',  # the trainer is writing this row right now
    )
    _metrics(b, [{"step": 1, "loss": 4.0, "lr": 1e-3, "tokens_per_s": 90.0}])
    folders = {"a": a, "b": b, "gone": tmp_path / "gone"}
    assert series(folders, "loss") == [
        {"run": "a", "step": 1, "value": 3.0},
        {"run": "a", "step": 3, "value": 2.5},
        {"run": "b", "step": 1, "value": 4.0},
    ]
    assert series(folders, "eval_loss") == [{"run": "a", "step": 2, "value": 2.9}]
    assert [p["value"] for p in series(folders, "lr")] == [1e-4, 2e-4, 3e-4, 1e-3]
    assert latest_table(folders) == [
        ["a", 3, 2.5, 2.9, 3e-4, 120.0],
        ["b", 1, 4.0, None, 1e-3, 90.0],
        ["gone", None, None, None, None, None],
    ]


def test_config_diff_between_two_runs_lists_every_changed_key(tmp_path):
    first, second = demo_config(), demo_config()
    second.lora.r = 16
    second.train.max_steps = 50  # a resume-mutable key still counts when comparing two runs
    for cfg, name in ((first, "a"), (second, "b")):
        (tmp_path / name).mkdir()
        save_config(cfg, tmp_path / name / "config.yaml")
    steps = first.train.max_steps
    assert diff(tmp_path / "a", tmp_path / "b") == f"lora.r: 8 -> 16\ntrain.max_steps: {steps} -> 50"
    assert diff(tmp_path / "a", tmp_path / "a") == "the two configs are the same"
    assert diff(tmp_path / "a", tmp_path / "missing").startswith("error:")

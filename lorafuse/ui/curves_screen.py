"""The curves screen: loss, eval loss, learning rate and tokens/s of the chosen runs, overlaid (one colour per
run) and re-read from metrics.jsonl at each tick of the page's timer; each run's newest values; and the config
diff of two runs (lorafuse.ui.curves)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from lorafuse.ui.curves import CURVES, diff, latest_table, series
from lorafuse.ui.runs import discover

LATEST = ["run", "step", *CURVES.values()]
FORMATS = ["{}", "{}", "{:.4f}", "{:.4f}", "{:.3g}", "{:,.0f}"]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _frame(points: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(points, columns=["run", "step", "value"])


def _latest(folders: dict) -> pd.DataFrame:
    rows = [["" if v is None else f.format(v) for f, v in zip(FORMATS, row)] for row in latest_table(folders)]
    return pd.DataFrame(rows, columns=LATEST)


def _plot(points: list[dict], names: list[str]):
    """A run keeps its colour in every plot, also in one where another run has no point yet."""
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(names))}
    return gr.LinePlot(_frame(points), color_map=colours)


def build(ctx) -> None:
    names = [r.name for r in discover(ctx.runs_dir)]
    chosen = gr.CheckboxGroup(names, label="runs to plot", elem_id="curves-runs")
    latest = gr.Dataframe(pd.DataFrame([], columns=LATEST), interactive=False, elem_id="curves-latest")
    plots = []
    keys = list(CURVES)
    for i in range(0, len(keys), 2):
        with gr.Row():
            for key in keys[i : i + 2]:
                plots.append(
                    gr.LinePlot(
                        _frame([]),
                        x="step",
                        y="value",
                        color="run",
                        title=CURVES[key],
                        y_title=CURVES[key],
                        elem_id=f"curve-{key}",
                    )
                )
    with gr.Row():
        first = gr.Dropdown(names, label="config of run A", elem_id="diff-a")
        second = gr.Dropdown(names, label="config of run B", elem_id="diff-b")
        compare = gr.Button("Config diff A -> B", elem_id="diff-button")
    shown = gr.Textbox(label="keys that differ (A -> B)", lines=6, interactive=False, elem_id="diff-text")
    known = gr.State(names)

    def folders(selected: list[str]) -> dict:
        runs = {r.name: r.folder for r in discover(ctx.runs_dir)}
        return {name: runs[name] for name in selected or [] if name in runs}

    def refresh(selected, previous):
        now = [r.name for r in discover(ctx.runs_dir)]
        picked = folders(selected)
        table = _latest(picked)
        frames = [_plot(series(picked, key), now) for key in CURVES]
        if now == previous:
            lists = [gr.skip()] * 3
        else:
            lists = [gr.CheckboxGroup(choices=now), gr.Dropdown(choices=now), gr.Dropdown(choices=now)]
        return [*lists, table, *frames, now]

    ctx.timer.tick(
        refresh,
        inputs=[chosen, known],
        outputs=[chosen, first, second, latest, *plots, known],
        show_progress="hidden",
    )

    def on_diff(a, b):
        runs = {r.name: r.folder for r in discover(ctx.runs_dir)}
        if a not in runs or b not in runs:
            return "pick two runs"
        return diff(runs[a], runs[b])

    compare.click(on_diff, inputs=[first, second], outputs=shown)

"""The runs screen: every run with its status (lorafuse.ui.runs), refreshed by the page's timer; stop and resume
the selected run, and the tail of the log of the process the UI started for it."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from lorafuse.errors import LorafuseError
from lorafuse.ui.runs import discover, ui_file

COLUMNS = ["run", "status", "step", "loss", "detail", "folder"]
LOG_LINES = 40


def table(runs) -> pd.DataFrame:
    rows = []
    for r in runs:
        step = "" if r.step is None else f"{r.step}" + (f"/{r.total}" if r.total else "")
        loss = "" if r.loss is None else f"{r.loss:.4f}"
        rows.append([r.name, r.status, step, loss, r.detail, str(r.folder)])
    return pd.DataFrame(rows, columns=COLUMNS)


def log_tail(ctx, name: str | None) -> str:
    if not name:
        return ""
    try:
        lines = ui_file(ctx.runs_dir, name, ".log").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log: this run was not started from this page)"
    return "\n".join(lines[-LOG_LINES:])


def build(ctx) -> None:
    runs = discover(ctx.runs_dir)
    names = [r.name for r in runs]
    grid = gr.Dataframe(table(runs), headers=COLUMNS, interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown(names, value=names[0] if names else None, label="run", elem_id="runs-pick", scale=3)
        stop = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="runs-stop", scale=1)
        resume = gr.Button("Resume", elem_id="runs-resume", scale=1)
    message = gr.Markdown(elem_id="runs-message")
    log = gr.Textbox(label=f"log (last {LOG_LINES} lines)", lines=12, interactive=False, elem_id="runs-log")
    known = gr.State(names)

    def refresh(selected, previous):
        runs = discover(ctx.runs_dir)
        now = [r.name for r in runs]
        choices = (
            gr.Dropdown(choices=now, value=selected or (now[0] if now else None)) if now != previous else gr.skip()
        )
        return table(runs), choices, log_tail(ctx, selected), now

    ctx.timer.tick(refresh, inputs=[pick, known], outputs=[grid, pick, log, known], show_progress="hidden")
    pick.change(lambda name: log_tail(ctx, name), inputs=pick, outputs=log, show_progress="hidden")

    def on_stop(name):
        run = next((r for r in discover(ctx.runs_dir) if r.name == name), None)
        if run is None:
            return "pick a run first"
        try:
            pid = ctx.launcher.stop(name, run.folder)
        except LorafuseError as err:
            return f"**{err.problem}**: {err.fix}"
        return f"sent SIGTERM to {name} (pid {pid}): it finishes its step, saves a checkpoint and exits"

    def on_resume(name):
        if not name:
            return "pick a run first"
        try:
            line = ctx.launcher.resume(name)
        except LorafuseError as err:
            return f"**{err.problem}**: {err.fix}"
        return f"resumed {name}: `{line}`"

    stop.click(on_stop, inputs=pick, outputs=message)
    resume.click(on_resume, inputs=pick, outputs=message)

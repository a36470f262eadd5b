"""The new-run screen: the config form (one widget per config key, lorafuse.ui.schema), where it starts from,
the planner's verdict updated as the form changes, the data preview, and the start button (lorafuse.ui.checks,
lorafuse.ui.runs.Launcher). Widget ids are `cfg-<section>-<key>` (schema.FieldSpec.elem_id)."""

from __future__ import annotations

import html

import gradio as gr

from lorafuse.config import RunConfig
from lorafuse.errors import LorafuseError
from lorafuse.ui.checks import DEMO, VISIBLE_GPU, card_choices, load_source, preview_html, sources, validate, verdict
from lorafuse.ui.runs import UI_DIR
from lorafuse.ui.schema import FieldSpec, form_fields, raw_config, widget_values

COLUMNS = 2
DEFAULT_CARD = "T4"  # the free notebook GPU: a small budget to plan against where no GPU is visible


def _widget(spec: FieldSpec, value):
    common = dict(label=spec.key, info=spec.info, elem_id=spec.elem_id)
    if spec.widget == "checkbox":
        return gr.Checkbox(value=value, **common)
    if spec.widget == "dropdown":
        return gr.Dropdown(list(spec.words), value=value, **common)
    if spec.widget == "checkboxes":
        return gr.CheckboxGroup(list(spec.words), value=value, **common)
    if spec.widget == "number":
        return gr.Number(value=value, **common)
    return gr.Textbox(value=value, placeholder="null" if spec.nullable else None, **common)


def _form(specs: list[FieldSpec], values: list) -> list:
    """One accordion per config section, COLUMNS widgets a row."""
    sections: dict[str, list] = {}
    for spec, value in zip(specs, values):
        sections.setdefault(spec.key.split(".")[0], []).append((spec, value))
    widgets = []
    for section, items in sections.items():
        title = f"{section}: {RunConfig.model_fields[section].description}"
        with gr.Accordion(title, open=True, elem_id=f"section-{section}"):
            for i in range(0, len(items), COLUMNS):
                with gr.Row(equal_height=False):
                    widgets += [_widget(spec, value) for spec, value in items[i : i + COLUMNS]]
    return widgets


def _verdict_md(specs, card, memory, values) -> str:
    cfg, error = validate(raw_config(specs, values))
    if cfg is None:
        return f"**the config is not valid**\n\n```\n{error}\n```"
    return verdict(cfg, card, memory)


def build(ctx) -> None:
    specs = form_fields()
    first = load_source(DEMO, ctx.runs_dir)
    cards = card_choices()
    card_value = VISIBLE_GPU if VISIBLE_GPU in cards else DEFAULT_CARD
    with gr.Row():
        source = gr.Dropdown(sources(ctx.runs_dir), value=DEMO, label="start from", elem_id="form-source", scale=4)
        load = gr.Button("Load", elem_id="form-load", scale=1)
    with gr.Row():
        with gr.Column(scale=1):
            widgets = _form(specs, widget_values(specs, first))
        with gr.Column(scale=1):
            start = gr.Button("Start training", variant="primary", elem_id="form-start")
            started = gr.Markdown(elem_id="form-start-message")
            with gr.Row():
                card = gr.Dropdown(cards, value=card_value, label="plan for card", elem_id="form-card")
                memory = gr.Textbox(label="or GPU memory", placeholder="e.g. 15GiB", elem_id="form-memory")
            planned = gr.Markdown(verdict(first, card_value, None), elem_id="form-verdict")
            with gr.Row():
                rows = gr.Number(3, label="rows", precision=0, minimum=1, elem_id="form-preview-rows", scale=1)
                preview = gr.Button("Preview data", elem_id="form-preview", scale=2)
            gr.Markdown("trained tokens bold green, masked (prompt) tokens dim, EOS on green when trained")
            shown = gr.HTML(elem_id="form-preview-html")

    def check(card, memory, *values):
        return _verdict_md(specs, card, memory, values)

    triggers = [w.input for w in widgets] + [card.input, memory.input]
    gr.on(triggers, check, inputs=[card, memory, *widgets], outputs=planned, trigger_mode="always_last")

    def on_load(name, card, memory):
        try:
            cfg = load_source(name, ctx.runs_dir)
        except LorafuseError as err:
            raise gr.Error(f"{err.problem} ({err.fix})") from None
        # the verdict comes in the same answer as the values, so no later answer can overwrite a newer one
        return [f"loaded {name}: edit it, then start", verdict(cfg, card, memory), *widget_values(specs, cfg)]

    load.click(on_load, inputs=[source, card, memory], outputs=[started, planned, *widgets])
    source.focus(lambda: gr.Dropdown(choices=sources(ctx.runs_dir)), outputs=source)

    def on_start(*values):
        cfg, error = validate(raw_config(specs, values))
        if cfg is None:
            return f"**not started: the config is not valid**\n\n```\n{error}\n```"
        try:
            name, line = ctx.launcher.start(cfg)
        except LorafuseError as err:
            return f"**not started: {err.problem}**\n\n{err.fix}"
        return f"started **{name}**: `{line}` (see the Runs tab)"

    start.click(on_start, inputs=widgets, outputs=started)

    def on_preview(n, *values):
        cfg, error = validate(raw_config(specs, values))
        if cfg is None:
            return f"<pre>{html.escape(error)}</pre>"
        return preview_html(cfg, max(1, int(n or 1)), cache_dir=ctx.runs_dir / UI_DIR / "cache")

    preview.click(on_preview, inputs=[rows, *widgets], outputs=shown)

"""The chat and export screen: talk to a run's adapter, merge it into its base, export it.

Chat loads as `lorafuse chat --model BASE --adapter DIR` does (lorafuse.load_model, lorafuse.load_adapter) and
answers with lorafuse.generate on the conversation's messages (the tokenizer's chat template, as in `lorafuse
chat`). One model is kept loaded; another base, adapter or setting loads afresh. A run's adapter is its adapter/
folder once it finished, else the adapter of its latest checkpoint. Merge calls lorafuse.merge (as `lorafuse
merge`), export lorafuse.export (`lorafuse export`) where this lorafuse has it; their default outputs are new
folders beside the run folder, never inside it (a run folder holds only what training wrote).
"""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from lorafuse.config import load_config
from lorafuse.errors import LorafuseError
from lorafuse.training.checkpoint import latest_checkpoint
from lorafuse.ui.runs import discover

EMPTY_REPLY = "(empty reply: the model ended its turn at once)"


def adapter_of(folder: Path) -> Path | None:
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "adapter"
    latest = latest_checkpoint(folder)
    return latest / "adapter" if latest is not None and (latest / "adapter").is_dir() else None


def defaults(ctx, name: str | None) -> list:
    """[base, quant, compute dtype, adapter, merge folder, export file] for run `name`."""
    run = next((r for r in discover(ctx.runs_dir) if r.name == name), None)
    if run is None or not (run.folder / "config.yaml").is_file():
        return [gr.skip()] * 6
    cfg = load_config(run.folder / "config.yaml")
    adapter = adapter_of(run.folder)
    parent = run.folder.parent
    return [
        cfg.model.path,
        cfg.model.quant,
        cfg.model.compute_dtype,
        "" if adapter is None else str(adapter),
        str(parent / f"{run.name}-merged"),
        str(parent / f"{run.name}.gguf"),
    ]


class _Loaded:
    """The one model kept in memory for chat, keyed by what it was loaded from."""

    def __init__(self):
        self.key, self.model, self.tokenizer = None, None, None
        self.lock = threading.Lock()

    def get(self, base: str, adapter: str, quant: str, dtype: str):
        import lorafuse

        key = (base, adapter, quant, dtype)
        with self.lock:
            if key != self.key:
                self.key, self.model, self.tokenizer = None, None, None  # free the old one before loading
                model, tokenizer = lorafuse.load_model(base, quant=quant, compute_dtype=dtype)
                if adapter:
                    model = lorafuse.load_adapter(model, adapter)
                self.key, self.model, self.tokenizer = key, model, tokenizer
            return self.model, self.tokenizer


def _chat_widgets(names):
    with gr.Row():
        run = gr.Dropdown(names, label="run", elem_id="chat-run", scale=2)
        base = gr.Textbox(label="base model", elem_id="chat-base", scale=3)
        quant = gr.Dropdown(["nf4", "none"], value="nf4", label="quant", elem_id="chat-quant", scale=1)
        dtype = gr.Dropdown(["auto", "bfloat16", "float16", "float32"], value="auto", label="compute dtype", scale=1)
    adapter = gr.Textbox(label="adapter folder (empty: the base model alone)", elem_id="chat-adapter")
    with gr.Row():
        temperature = gr.Number(0.7, label="temperature (0 = greedy)", elem_id="chat-temperature")
        top_p = gr.Number(0.9, label="top_p", elem_id="chat-top-p")
        max_new = gr.Number(256, label="max new tokens", precision=0, elem_id="chat-max-new")
        system = gr.Textbox(label="system prompt", elem_id="chat-system")
    return run, base, quant, dtype, adapter, temperature, top_p, max_new, system


def build(ctx) -> None:
    names = [r.name for r in discover(ctx.runs_dir)]
    run, base, quant, dtype, adapter, temperature, top_p, max_new, system = _chat_widgets(names)
    _conversation(base, adapter, quant, dtype, temperature, top_p, max_new, system)
    merged, exported = _merge_and_export(base, adapter)
    run.focus(lambda: gr.Dropdown(choices=[r.name for r in discover(ctx.runs_dir)]), outputs=run)
    run.change(lambda name: defaults(ctx, name), inputs=run, outputs=[base, quant, dtype, adapter, merged, exported])


def _conversation(base, adapter, quant, dtype, temperature, top_p, max_new, system) -> None:
    """The chat history, the message box and its buttons; each message is answered by the model `base` + `adapter`
    (kept loaded while they stay the same)."""
    chatbot = gr.Chatbot(label="chat", elem_id="chat-history", height=320)
    history = gr.State([])
    with gr.Row():
        message = gr.Textbox(label="message", elem_id="chat-message", scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", elem_id="chat-clear", scale=1)
    loaded = _Loaded()

    def on_send(turns, text, base, adapter, quant, dtype, temperature, top_p, max_new, system):
        import lorafuse

        if not text.strip():
            return turns, turns, text
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        messages.append({"role": "user", "content": text})
        try:
            model, tokenizer = loaded.get(base, adapter, quant, dtype)
            reply = lorafuse.generate(
                model, tokenizer, messages, max_new_tokens=int(max_new), temperature=temperature, top_p=top_p
            )
        except LorafuseError as err:
            raise gr.Error(f"{err.problem} ({err.fix})") from None
        turns = turns + [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        shown = [{**t, "content": t["content"] or EMPTY_REPLY} for t in turns]  # the history keeps the real reply
        return turns, shown, ""

    inputs = [history, message, base, adapter, quant, dtype, temperature, top_p, max_new, system]
    send.click(on_send, inputs=inputs, outputs=[history, chatbot, message])
    message.submit(on_send, inputs=inputs, outputs=[history, chatbot, message])
    clear.click(lambda: ([], []), outputs=[history, chatbot])


def _merge_and_export(base, adapter):
    """The merge and export panel; returns its two output path boxes (a run's choice fills them)."""
    with gr.Accordion("Merge and export", open=True):
        with gr.Row():
            merged = gr.Textbox(label="merged model folder", elem_id="merge-out", scale=4)
            merge_dtype = gr.Dropdown(["bfloat16", "float16", "float32"], value="bfloat16", label="dtype", scale=1)
            merge = gr.Button("Merge", elem_id="merge-button", scale=1)
        with gr.Row():
            exported = gr.Textbox(label="export file (GGUF)", elem_id="export-out", scale=4)
            export = gr.Button("Export", elem_id="export-button", scale=1)
        status = gr.Markdown(elem_id="merge-status")

    def on_merge(base, adapter, out, dtype):
        import lorafuse

        try:
            result = lorafuse.merge(base, adapter, out, dtype=dtype)
        except LorafuseError as err:
            return f"**merge failed: {err.problem}**\n\n{err.fix}"
        diff = result.max_logit_diff
        check = "" if diff is None else f" (max logit difference vs base+adapter: {diff:.3g})"
        return f"merged model written to `{result}`{check}"

    def on_export(base, adapter, out):
        import lorafuse

        try:
            result = lorafuse.export(base, adapter, out, format="gguf")
        except LorafuseError as err:
            return f"**export failed: {err.problem}**\n\n{err.fix}"
        return f"exported to `{result}`"

    merge.click(on_merge, inputs=[base, adapter, merged, merge_dtype], outputs=status)
    export.click(on_export, inputs=[base, adapter, exported], outputs=status)
    return merged, exported

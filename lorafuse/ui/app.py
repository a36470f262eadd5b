"""`lorafuse ui`: build the Gradio page from its screens and serve it (bound to 127.0.0.1 unless told otherwise).

The page polls the run folders every POLL_S seconds (one gr.Timer shared by the screens) for the runs list and
the live curves. Fonts are the browser's own (no font download: the page works offline).
"""

from __future__ import annotations

import errno
import importlib.util
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.ui.runs import Launcher

POLL_S = 2.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CSS = """
.lf-preview span { border-radius: 2px; }
#runs-table, #curves-latest { font-size: 13px; }
#form-verdict pre, #form-verdict code { font-size: 10px !important; line-height: 1.35 !important; }
"""


@dataclass
class Context:
    """What the screens share: the runs folder, the process launcher and the polling timer."""

    runs_dir: Path
    launcher: Launcher
    timer: object = None  # gr.Timer


def require_gradio() -> None:
    if importlib.util.find_spec("gradio") is None:
        raise LorafuseError(
            "`lorafuse ui` needs Gradio, which is not installed",
            "pip install 'lorafuse[ui]' (or pip install gradio)",
        )


def build_app(runs_dir: str | Path, launcher: Launcher | None = None):
    """The gr.Blocks page for the runs under `runs_dir`."""
    import gradio as gr

    from lorafuse.ui import chat_screen, curves_screen, form_screen, runs_screen

    runs_dir = Path(runs_dir).resolve()
    ctx = Context(runs_dir, launcher or Launcher(runs_dir))
    with gr.Blocks(title="lorafuse", analytics_enabled=False) as app:
        gr.Markdown(f"## lorafuse &nbsp; <small>runs in `{runs_dir}`</small>")
        ctx.timer = gr.Timer(POLL_S)
        with gr.Tabs():
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs_screen.build(ctx)
            with gr.Tab("New run", id="form", elem_id="tab-form"):
                form_screen.build(ctx)
            with gr.Tab("Curves", id="curves", elem_id="tab-curves"):
                curves_screen.build(ctx)
            with gr.Tab("Chat & export", id="chat", elem_id="tab-chat"):
                chat_screen.build(ctx)
    return app


def theme():
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "SFMono-Regular", "monospace"]
    )


def check_address(host: str, port: int) -> None:
    """Refuse, with the fix, an address the page cannot be served on: a host name that does not resolve, an
    address not on this machine, a port another program holds."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LorafuseError(
            f"cannot serve on --host {host}: the name does not resolve ({e.strerror})",
            "give an address of this machine: 127.0.0.1 (this machine only) or 0.0.0.0 (every network)",
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed page's port is free
        try:
            probe.bind(address)
        except OSError as e:
            taken = e.errno in (errno.EADDRINUSE, errno.EACCES)
            raise LorafuseError(
                f"cannot serve on {host}:{port}: {e.strerror}",
                f"choose another port, e.g. --port {port + 1 if port < 65535 else 7860}, or stop the program using it"
                if taken
                else "give an address of this machine: 127.0.0.1 (this machine only) or 0.0.0.0 (every network)",
            ) from None


def serve(runs: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; `block=False` returns once it is up (tests)."""
    require_gradio()
    check_address(host, port)
    if host not in LOCAL_HOSTS:
        print(
            f"warning: serving on {host}: anyone who can reach this machine on port {port} can start runs and "
            "read your data and adapters; the page has no login",
            file=sys.stderr,
        )
    Path(runs).mkdir(parents=True, exist_ok=True)
    app = build_app(runs)
    app.queue(default_concurrency_limit=4)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        theme=theme(),
        css=CSS,
        footer_links=[],
        quiet=False,
        ssr_mode=False,
    )
    return app

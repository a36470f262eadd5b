"""The rich console lorafuse prints through, and the other libraries' progress bars kept out of its output.

On a terminal, rich's own behaviour (colours, the terminal's width, live progress bars). Anywhere else (a pipe, a
file, a CI log) no line is wrapped: rich would break every line at 80 columns, cutting numbers and paths in two, so
`soft_wrap` is on there. transformers' and huggingface_hub's tqdm bars ("Loading weights", "Writing model shards",
downloads) would interleave with lorafuse's own progress lines; the `lorafuse` command turns them off
(`quiet_library_progress`) before it imports either library's models.
"""

from __future__ import annotations


def make_console(stderr: bool = False, **kwargs):
    """A rich Console for stdout (or stderr; `kwargs` as rich takes them) that never wraps lines when it is not a
    terminal."""
    from rich.console import Console

    console = Console(stderr=stderr, **kwargs)
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def quiet_library_progress() -> None:
    """No tqdm bars from huggingface_hub, nor from transformers (which reads huggingface_hub's switch when it is
    imported, and is told directly when it already is)."""
    import sys

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()

"""What the run form shows about a config: where it starts from, whether it is valid, the planner's verdict,
and the data preview. Each is the CLI's own function, called as the CLI calls it:

    validate(raw)             lorafuse.config.validate_config (the check `lorafuse train` makes): a RunConfig, or
                              the one ConfigError's problem and fix
    verdict(cfg, card, mem)   lorafuse.plan.plan(cfg, gpu_memory=mem, gpu=card), as `lorafuse plan CONFIG --gpu CARD
                              --gpu-memory MEM`: a headline (fits or not, the peak, the budget) over the text
                              `lorafuse plan` prints (the components, the fastest setting that fits, its command).
                              On a machine without a GPU the card or memory chosen in the form is planned for.
    preview_html(cfg, n, dir) `lorafuse data preview`'s output (lorafuse.preview.preview) recorded by a rich
                              console and exported as HTML with the CLI's styles: trained tokens bold green, masked
                              (prompt) tokens dim, a trained EOS on green, a masked EOS on red.
    sources(runs) / load_source(name, runs)
                              the configs a form can start from: the built-in demo, examples/*.yaml, and each run's
                              config.yaml. An example's output.dir is pointed into the runs folder; a run's config
                              keeps its own folder, so starting it again resumes that run, as the same CLI command does.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from lorafuse.config import RunConfig, demo_config, load_config, validate_config
from lorafuse.errors import LorafuseError

DEMO = "built-in demo"
VISIBLE_GPU = "the visible GPU"
PREVIEW_COLUMNS = 74  # the preview sits in the form's side column
_PRE = (
    '<pre class="lf-preview" style="white-space: pre-wrap; font-family: ui-monospace, monospace; '
    'font-size: 12px; line-height: 1.4; padding: 6px">{code}</pre>'
)


def validate(raw: dict) -> tuple[RunConfig | None, str]:
    try:
        return validate_config(raw, source="the form"), ""
    except LorafuseError as err:
        return None, _message(err)


def _message(err: LorafuseError) -> str:
    return f"error: {err.problem}" + (f"\nfix: {err.fix}" if err.fix else "")


def card_choices() -> list[str]:
    """The visible GPU first when there is one, then the planner's cards (lorafuse.plan.speed.CARDS)."""
    from lorafuse.plan.speed import CARDS, detect_gpu

    return ([VISIBLE_GPU] if detect_gpu() is not None else []) + [c.name for c in CARDS]


def verdict(cfg: RunConfig, card: str | None, memory: str | None) -> str:
    """Markdown: the planner's verdict on `cfg` for a card and/or a memory size (module docstring)."""
    from lorafuse.plan import plan
    from lorafuse.plan.cli import render
    from lorafuse.plan.memory import GIB

    gpu = None if card in (None, "", VISIBLE_GPU) else card
    try:
        p = plan(cfg, gpu_memory=(memory or "").strip() or None, gpu=gpu)
    except LorafuseError as err:
        return f"**planner:** {_message(err)}"
    peak = p.estimate.peak / GIB
    if p.fits is None:
        head = f"predicted peak **{peak:.2f} GiB**; pick a card or a memory size to check that it fits"
    else:
        word = "fits" if p.fits else "does NOT fit"
        head = f"**{word}**: predicted peak {peak:.2f} GiB of {p.budget / GIB:.2f} GiB ({p.budget_source})"
    return f"{head}\n\n```\n{render(p)}\n```"


def preview_html(cfg: RunConfig, n: int = 3, cache_dir: Path | None = None) -> str:
    """`cache_dir`: where the tokenized rows are cached when data.cache_dir is null, instead of <output.dir>/.cache
    (a run refuses an output folder holding files it did not write, and the run has not started yet)."""
    from rich.console import Console

    from lorafuse.preview import preview

    if cache_dir is not None and cfg.data.cache_dir is None:
        cfg = cfg.model_copy(deep=True)
        cfg.data.cache_dir = str(cache_dir)

    console = Console(
        record=True, file=io.StringIO(), width=PREVIEW_COLUMNS, force_terminal=True, color_system="truecolor"
    )
    try:
        preview(cfg, n=n, console=console)
    except LorafuseError as err:
        return f"<pre>{html.escape(_message(err))}</pre>"
    return console.export_html(inline_styles=True, code_format=_PRE)


def example_files() -> list[Path]:
    """examples/*.yaml of a source checkout and of the current folder."""
    roots = [Path(__file__).resolve().parents[2] / "examples", Path.cwd() / "examples"]
    seen, found = set(), []
    for root in roots:
        for path in sorted(root.glob("*.yaml")) if root.is_dir() else []:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                found.append(path)
    return found


def sources(runs_dir: Path) -> list[str]:
    """The names load_source accepts: the demo, example files, and runs' config.yaml files."""
    from lorafuse.ui.runs import discover

    runs = [str(r.folder / "config.yaml") for r in discover(runs_dir) if (r.folder / "config.yaml").is_file()]
    return [DEMO] + [str(p) for p in example_files()] + runs


def load_source(name: str, runs_dir: Path) -> RunConfig:
    if name == DEMO:
        cfg, folder = demo_config(), Path(runs_dir) / "demo"
    else:
        path = Path(name)
        cfg = load_config(path)
        is_run = path.name == "config.yaml"
        folder = path.parent if is_run else Path(runs_dir) / path.stem
    cfg.output.dir = str(folder.resolve())
    return cfg

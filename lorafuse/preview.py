"""`lorafuse data preview`: show exactly what the model will be trained on, before any GPU time is spent.

For the first `n` training examples it prints the decoded text with trained tokens in bold green and masked
(prompt) tokens dim; special tokens are shown as markers: [BOS], [EOS] (green when trained, red when masked,
which would mean the model never learns to stop), [PAD]. Preference data (data.format=preference) is shown by
pair: the prompt once, then the chosen and the rejected response with their trained tokens. Then the data
statistics: rows read/used/dropped and why, tokens, masked share, truncation, cache hit, and a text bar chart of
row lengths. Last, the run's check of the token rows the data uses (model/untrained_tokens.py), on the
checkpoint's tables read from disk.
"""

from __future__ import annotations

from lorafuse.data.build import build_datasets, cache_dir_for
from lorafuse.data.stats import DataStats
from lorafuse.data.tokenize import IGNORE
from lorafuse.model.load import load_tokenizer
from lorafuse.model.untrained_tokens import preview_lines
from lorafuse.outputs import prepare_run_dir
from lorafuse.run_data import add_config_tokens

_BAR = 30


def preview(cfg, n: int = 5, console=None, tokenizer=None) -> DataStats:
    """Print `n` rendered training examples and the data statistics for run config `cfg`; returns the stats."""
    from lorafuse.console import make_console

    console = console or make_console()
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.path)
    new_ids = add_config_tokens(cfg, None, tokenizer, console)
    if not cfg.data.cache_dir:  # the cache goes into the run folder: it becomes the run's, as `lorafuse train` makes it
        prepare_run_dir(cfg.output.dir)
    train, val, stats = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed, cache_dir=cache_dir_for(cfg))
    (_print_pairs if cfg.data.format == "preference" else _print_examples)(train, n, console, tokenizer)
    console.rule("legend")
    console.print(_legend())
    console.rule("statistics")
    for line in stats.summary():
        console.print(line, markup=False)
    console.print("row lengths (tokens):", markup=False)
    for line in histogram_lines(stats.histogram):
        console.print(line, markup=False)
    console.rule("token rows")
    for line in preview_lines(cfg.model, tokenizer, (train, val), new_ids, cfg.lora):
        console.print(line, markup=False, highlight=False)
    return stats


def _print_examples(train, n: int, console, tokenizer) -> None:
    for i in range(min(n, len(train))):
        ex = train[i]
        console.rule(
            f"example {i + 1} of {len(train)} (source row {int(train.rows[i]) + 1}, {len(ex['input_ids'])} tokens)"
        )
        console.print(render_example(ex["input_ids"], ex["labels"], tokenizer))


def _print_pairs(train, n: int, console, tokenizer) -> None:
    """Preference pairs (data set rows 2k, 2k+1): the prompt once, then each response with its trained tokens."""
    for k in range(min(n, len(train) // 2)):
        chosen, rejected = train[2 * k], train[2 * k + 1]
        start = next(t for t, lab in enumerate(chosen["labels"]) if lab != IGNORE)
        console.rule(f"pair {k + 1} of {len(train) // 2} (source row {int(train.rows[2 * k]) + 1})")
        console.print("prompt:", style="bold")
        console.print(render_example(chosen["input_ids"][:start], chosen["labels"][:start], tokenizer))
        for name, ex in (("chosen", chosen), ("rejected", rejected)):
            first = next(t for t, lab in enumerate(ex["labels"]) if lab != IGNORE)
            console.print(f"{name} ({len(ex['input_ids']) - first} response tokens):", style="bold")
            console.print(render_example(ex["input_ids"][first:], ex["labels"][first:], tokenizer))


def _legend():
    from rich.text import Text

    t = Text()
    t.append("trained", style="bold green")
    t.append("  ")
    t.append("masked (no loss)", style="dim")
    t.append("  ")
    t.append("[EOS]", style="bold black on green")
    t.append(" trained EOS  ")
    t.append("[EOS]", style="bold white on red")
    t.append(" masked EOS (the model would not learn to stop)")
    return t


def render_example(input_ids: list[int], labels: list[int], tokenizer):
    """A rich Text of one example: runs of trained/masked tokens decoded together, special tokens as markers."""
    from rich.text import Text

    # later keys win, so a PAD that is also EOS is shown as EOS
    special = {tokenizer.pad_token_id: "PAD", tokenizer.bos_token_id: "BOS", tokenizer.eos_token_id: "EOS"}
    special.pop(None, None)
    all_special = set(getattr(tokenizer, "all_special_ids", []))
    text = Text()
    run: list[int] = []
    run_trained = False

    def flush():
        if run:
            text.append(tokenizer.decode(run), style="bold green" if run_trained else "dim")
            run.clear()

    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE
        if tok in special or tok in all_special:
            flush()
            name = special.get(tok) or tokenizer.convert_ids_to_tokens(tok)
            style = (
                ("bold black on green" if trained else "bold white on red")
                if name == "EOS"
                else ("bold green" if trained else "dim")
            )
            text.append(f"[{name}]", style=style)
            continue
        if trained != run_trained:
            flush()
            run_trained = trained
        run.append(tok)
    flush()
    return text


def histogram_lines(histogram: list[tuple[int, int, int]]) -> list[str]:
    """'  64-127   ██████████ 101' bars, scaled so the biggest bin is _BAR characters."""
    if not histogram:
        return []
    top = max(c for _, _, c in histogram) or 1
    width = len(str(histogram[-1][1] - 1))
    return [f"  {lo:>{width}}-{hi - 1:<{width}} {'█' * round(c / top * _BAR):<{_BAR}} {c}" for lo, hi, c in histogram]

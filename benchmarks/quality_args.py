"""The command line of the quality benchmark (benchmarks/quality.py): what to train and score, on which bases and
seeds, and where its rows go; the lists it takes (methods, seeds, bases) split and checked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def parse_args(argv, methods: dict, description: str):
    """quality.py's command line: `argv` parsed and checked (`methods`: the names --methods may choose from)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one learning rate: the pipeline on a CPU")
    p.add_argument(
        "--stand-in",
        action="store_true",
        help="a 128-wide base pretrained for 600 steps of 16 x 128 tokens: the grid's questions on a CPU, about 2 "
        "minutes of pretraining and under a minute a run on one thread",
    )
    grid = [m for m, (_, settings) in methods.items() if not settings.get("only")]  # the diagnostics on request
    p.add_argument("--methods", default=",".join(grid), help="comma-separated subset of " + ", ".join(methods))
    p.add_argument("--lrs", default=None, help="one LR grid for every method, e.g. 1e-3,3e-3 (default: per kind)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default 300; smoke 4)")
    _adapter_options(p)
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps (default 3000; smoke 20)")
    p.add_argument("--eval-rows", type=int, help="held-out rows scored (default 300; smoke 16)")
    p.add_argument("--sort-length", type=int, help="digits to sort (default 6): the task's difficulty")
    p.add_argument(
        "--bases",
        default="plain,zeroed",
        help="which bases to fine-tune: plain (template rows as pretrained), zeroed (as real bases ship them), or both",
    )
    p.add_argument(
        "--base",
        help="a folder for the pretrained bases: pretrain and save them there when it holds none, else reuse them "
        "(one pretraining for several tasks or grids)",
    )
    p.add_argument(
        "--seeds",
        "--seed",
        default="0",
        help="comma-separated seeds, e.g. 0,1,2: each cell runs once per seed (its own rows, adapter init and batch "
        "order) and the table gives the mean and the range; the first seed also seeds the pretraining",
    )
    p.add_argument(
        "--pretrain-only",
        action="store_true",
        help="pretrain into --base (or find it there) and stop: for runs that share one base side by side",
    )
    p.add_argument(
        "--tag",
        default=None,
        help="a name recorded in every run row, so runs made side by side (one process per seed or base) can be "
        "reported together with --report TAG",
    )
    p.add_argument(
        "--report",
        metavar="TAG[,TAG...]",
        help="train nothing: print the table of the run rows tagged TAG in --out's results files (all seeds and "
        "bases they hold) and append its best rows; several tags: grids run apart on one base (e.g. full "
        "fine-tuning and the adapters, each with its own --lrs) in one table",
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return _checked(p, p.parse_args(argv), methods)


def _adapter_options(p: argparse.ArgumentParser) -> None:
    """The options every adapter method trains with: LoRA+, the token rows' start, rank, kind, tables trained whole."""
    p.add_argument(
        "--loraplus-ratio", type=float, default=1.0, help="LoRA+ for every adapter: B at this many times the rate"
    )
    p.add_argument(
        "--token-row-init",
        choices=("sample", "mean"),
        default="sample",
        help="lorafuse's lora.token_row_init: where the template's untrained rows start (default sample)",
    )
    p.add_argument("--rank", type=int, help="the adapters' rank r, alpha 2r (default: the seed's r 16, alpha 32)")
    p.add_argument(
        "--variant",
        choices=("plain", "rslora", "dora", "pissa"),
        default="plain",
        help="the adapters' kind: plain LoRA, rank-stabilised scaling, DoRA (lorafuse and peft), or PiSSA's start "
        "from the weights' top singular vectors (peft only)",
    )
    p.add_argument(
        "--modules-to-save",
        help="modules every adapter trains in full beside it, comma-separated (lora.modules_to_save), e.g. "
        "embed_tokens,lm_head",
    )
    p.add_argument(
        "--modules-lr",
        type=float,
        help="the rate of the modules --modules-to-save trains whole (train.modules_to_save_lr; default each run's lr)",
    )
    p.add_argument(
        "--token-rows-lr",
        type=float,
        help="the rate of the token rows lorafuse trains (train.token_rows_lr; default each run's lr)",
    )


def _checked(p: argparse.ArgumentParser, args, methods: dict):
    """The parsed lists (methods, seeds, bases) split and checked; a bad value is the parser's usage error."""
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(methods)}")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if args.pretrain_only and not args.base:
        p.error("--pretrain-only needs --base DIR: the folder the bases are saved in")
    args.seed = args.seeds[0]  # the pretraining's
    args.bases = [v.strip() for v in args.bases.split(",") if v.strip()]
    if not args.bases or set(args.bases) - {"plain", "zeroed"}:
        p.error(f"--bases {','.join(args.bases)!r}: give plain, zeroed or plain,zeroed")
    return args

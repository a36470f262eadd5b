"""The arguments of the benchmark harness (benchmarks/bench.py, `lorafuse bench`).

The command line: what to measure, which stacks, and lorafuse's own settings, which
the peers do not have (a run that sets one of them compares only lorafuse with itself).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lorafuse.config_sections import ExperimentalConfig
from lorafuse.errors import LorafuseError
from lorafuse.plan.shapes import builtin_names

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("lorafuse", "hf", "unsloth")
METHODS = ("qlora", "lora", "full")
OBJECTIVES = ("sft", "dpo")
JOB_METHODS = ("qlora", "lora")  # what --job runs beside: the `lorafuse train` job trains adapters
DEFAULT_BATCH = 4  # sequences of an SFT step
DEFAULT_PAIRS = 4  # preference pairs of a DPO step (2 x 4 rows)
EXPERIMENTAL_KEYS = tuple(ExperimentalConfig.model_fields)  # the config's A/B switches (`--experimental`)
PROMPT_SHARE = 4  # a DPO row's first seq // 4 tokens are its prompt (no loss), the rest its response


def prompt_tokens(seq: int) -> int:
    """The prompt tokens of a DPO row of `seq` tokens, shared by the pair's two rows; the response follows."""
    return max(1, seq // PROMPT_SHARE)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lorafuse bench", description=__doc__.splitlines()[0])
    _step_args(p)
    _run_args(p)
    _adapter_args(p)
    group = p.add_argument_group("lorafuse only", "settings the peers do not have")
    _lorafuse_memory_args(group)
    _lorafuse_switch_args(group)
    return _checked(p.parse_args(argv))


def _step_args(p) -> None:
    """What one timed step is: the shape, the objective, the micro-batch, the stacks and methods, how many steps."""
    p.add_argument("--shape", default="llama2-7b", help=f"model shape: {', '.join(builtin_names())}")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="sft",
        help="what a step trains: sft (the next-token loss on every token) or dpo (DPO's sigmoid loss on preference "
        "pairs, the reference from the same weights: see benchmarks/README.md)",
    )
    p.add_argument("--batch", type=int, default=None, help=f"sequences per SFT step (default {DEFAULT_BATCH})")
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help=f"preference pairs per DPO step, 2 rows each: chosen and rejected (default {DEFAULT_PAIRS})",
    )
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--stacks", default="lorafuse,hf,unsloth", help=f"comma list of {', '.join(STACKS)}")
    p.add_argument("--methods", default="qlora,lora", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")


def _run_args(p) -> None:
    """Where results go, the device and dtype, the model's source, memory caps, profiling, runner time, seed."""
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the JSONL results")
    p.add_argument(
        "--memory-log",
        default=str(ROOT / "benchmarks" / "measured_memory.jsonl"),
        help="where lorafuse GPU runs append measured peaks (empty string: nowhere)",
    )
    p.add_argument("--table", action="store_true", help="full / LoRA / QLoRA of one model vs the seed's table")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="compute dtype; default: bf16 on CUDA, fp32 on CPU (float16: the T4 path, with a GradScaler)",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="lorafuse only: generate the model on the device layer by layer (NF4 straight away for "
        "qlora), no checkpoint on disk; for shapes too large to save, such as llama-65b",
    )
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="cap each runner's GPU memory (torch.cuda.set_per_process_memory_fraction) to this many GiB",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, profile 2 more steps with torch.profiler; tables go to DIR/<stack>-<method>.txt",
    )
    p.add_argument(
        "--model-dir",
        default=os.environ.get("LORAFUSE_BENCH_DIR", "/tmp/lorafuse-bench"),
        help="cache of the random-init checkpoint folders",
    )
    p.add_argument("--timeout", type=int, default=900, help="seconds per runner process")
    p.add_argument("--seed", type=int, default=0)


def _adapter_args(p) -> None:
    """The LoRA settings and optimizers every stack runs with, and checkpointing."""
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument(
        "--dropout", type=float, default=0.0, help="LoRA dropout for every stack (Unsloth's fast path needs 0)"
    )
    p.add_argument("--optimizer", default="paged_adamw_8bit", choices=("paged_adamw_8bit", "adamw_8bit", "adamw"))
    p.add_argument(
        "--full-optimizer",
        default="adamw",
        choices=("adamw", "paged_adamw_8bit", "adamw_8bit"),
        help="optimizer of the full fine-tuning row (torch AdamW: states counted on the GPU)",
    )
    p.add_argument("--no-gc", action="store_true", help="no gradient checkpointing (default: on, as the seed)")


def _lorafuse_memory_args(p) -> None:
    """lorafuse's own memory settings (a run with peers applies them to lorafuse's rows only)."""
    p.add_argument(
        "--offload",
        action="store_true",
        help="lorafuse only: checkpointing with the layer inputs in "
        "pinned CPU memory (train.gradient_checkpointing: offload)",
    )
    p.add_argument(
        "--host-embeddings",
        action="store_true",
        help="lorafuse only: the frozen input embedding in pinned CPU memory, read in place (train.embeddings_on_host)",
    )
    p.add_argument(
        "--keep-layers",
        type=int,
        default=0,
        metavar="N",
        help="lorafuse only: the last N layers save "
        "their activations instead of recomputing them (train.uncheckpointed_layers)",
    )
    p.add_argument(
        "--host-head",
        action="store_true",
        help="lorafuse only: the frozen output head in pinned CPU "
        "memory between losses, staged for each (train.head_on_host)",
    )
    p.add_argument(
        "--dequant-cap-mib",
        type=int,
        default=0,
        metavar="MIB",
        help="lorafuse only: NF4 weights over MIB (16-bit) dequantized in row parts (train.dequant_cap_mib)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="lorafuse only: FP8 base-weight GEMMs in the forward and "
        "the recompute (train.fp8; compute capability 8.9+)",
    )


def _lorafuse_switch_args(p) -> None:
    """lorafuse's own run switches: the job beside the harness, the fused kernels, graphs, A/B keys, shared prompts."""
    p.add_argument(
        "--job",
        action="store_true",
        help="also run the `lorafuse train` job itself (lorafuse.job.run) on the same step for each lorafuse qlora / "
        "lora run: its row (runner job) beside the harness's, with the ratio of their step times",
    )
    p.add_argument("--no-fast-path", action="store_true", help="lorafuse without its fused kernels")
    p.add_argument("--no-graphs", action="store_true", help="lorafuse without CUDA graphs (eager launches)")
    p.add_argument(
        "--experimental",
        action="append",
        default=[],
        metavar="KEY",
        choices=EXPERIMENTAL_KEYS,
        help="lorafuse only: turn on a switch of the config's experimental section, for an A/B against a run "
        f"without it (repeatable; one of {', '.join(EXPERIMENTAL_KEYS)})",
    )
    p.add_argument(
        "--shared-prompt",
        choices=("auto", "off"),
        default="auto",
        help="lorafuse's DPO step: train.shared_prompt (auto: each pair's prompt runs once, as `lorafuse train` "
        "does; off: a row per answer, as the peers run it)",
    )


def _checked(args):
    """Validate the parsed arguments and fill the dtype default; the errors say what to change."""
    if args.shape not in builtin_names():
        raise LorafuseError(f"unknown --shape {args.shape!r}", f"use one of {', '.join(builtin_names())}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    _micro_batch(args)
    # --random-init builds lorafuse's model on the GPU instead of loading the checkpoint folder the peers load, so
    # a run with peers would not compare one model. The memory settings (--offload, --host-*, --keep-layers) are
    # lorafuse's own: with peers they apply to lorafuse's rows only, and the peers run their defaults
    if args.random_init and (args.table or _split(args.stacks, STACKS, "--stacks") != ["lorafuse"]):
        raise LorafuseError(
            "--random-init applies to lorafuse only (the peers load the checkpoint folder)",
            "add --stacks lorafuse, or drop --random-init",
        )
    if args.offload and args.no_gc:
        raise LorafuseError(
            "--offload is a checkpointing policy, and --no-gc turns checkpointing off", "drop one of them"
        )
    if args.job:
        _job_combination(args)
    return args


def _job_combination(args) -> None:
    """--job runs `lorafuse train` on the checkpoint folder, SFT, for lorafuse's adapter methods."""
    if args.objective == "dpo":
        raise LorafuseError(
            "--job times the `lorafuse train` job's SFT steps, not DPO", "drop --job with --objective dpo"
        )
    if args.random_init:
        raise LorafuseError(
            "--job loads the checkpoint folder as `lorafuse train` does; --random-init generates the model instead",
            "drop --random-init (or --job)",
        )
    runs = plan_runs(args)
    if not any(stack == "lorafuse" and method in JOB_METHODS for stack, method in runs):
        raise LorafuseError(
            "--job runs beside lorafuse's qlora or lora runs, and this run has none",
            "add lorafuse to --stacks and qlora or lora to --methods",
        )


def _micro_batch(args) -> None:
    """Fill args.batch with the rows of one micro-batch: --batch sequences for sft, 2 x --pairs rows for dpo (each
    pair's chosen row and rejected row, one forward for both); args.pairs stays None for sft."""
    if args.objective == "sft":
        if args.pairs is not None:
            raise LorafuseError("--pairs counts preference pairs of a DPO step", "add --objective dpo, or drop --pairs")
        args.batch = DEFAULT_BATCH if args.batch is None else args.batch
    else:
        if args.batch is not None:
            raise LorafuseError(
                "--batch counts the sequences of an SFT step; a DPO step's micro-batch is counted in pairs",
                f"give --pairs N instead (N pairs = 2N rows of --seq tokens; default {DEFAULT_PAIRS})",
            )
        if args.table:
            raise LorafuseError("--table compares SFT steps with the seed's table", "drop --table with --objective dpo")
        if args.seq < 2:
            raise LorafuseError(
                f"--seq {args.seq} leaves no room for a prompt and a response", "give --seq 2 or more with dpo"
            )
        args.pairs = DEFAULT_PAIRS if args.pairs is None else args.pairs
        args.batch = 2 * args.pairs
    if args.batch < 1 or (args.pairs is not None and args.pairs < 1):
        raise LorafuseError("the micro-batch is empty", "give --batch 1 or more (--pairs with dpo)")


def plan_runs(args) -> list[tuple[str, str]]:
    if args.table:
        return [("hf", "full"), ("lorafuse", "lora"), ("lorafuse", "qlora")]
    stacks, methods = _split(args.stacks, STACKS, "--stacks"), _split(args.methods, METHODS, "--methods")
    return [(s, m) for m in methods for s in stacks]


def _split(text: str, allowed: tuple, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise LorafuseError(f"{flag} {text!r}: unknown {bad}", f"use a comma list of {', '.join(allowed)}")
    return items

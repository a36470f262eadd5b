"""The `lorafuse` command line's parser: subcommands, their options, examples and value checks (no commands here).

`build_parser()` returns the argparse parser `lorafuse.cli.main` runs; each subcommand's `func` default is its name
(lorafuse.cli.COMMANDS maps it to the function). Option values are checked here (`_number`: finite, in range), and a
usage error prints in lorafuse's two-line form ("error: ..." and a fix line), exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys

from lorafuse.version import __version__

_EPILOG = {
    "main": """examples:
  lorafuse train                                   # built-in demo: tiny model, CPU, a few minutes
  lorafuse train examples/llama2-7b-dolly-ja-qlora.yaml lora.r=32
  lorafuse data preview examples/tiny-cpu.yaml -n 3
  lorafuse plan examples/llama2-7b-dolly-ja-qlora.yaml --gpu-memory 15GiB
  lorafuse generate --model meta-llama/Llama-2-7b-hf --adapter runs/dolly-ja/adapter --prompt "..."
  lorafuse env""",
    "train": """Example:
  lorafuse train examples/llama2-7b-dolly-ja-qlora.yaml lora.r=32 train.lr=1e-4
  lorafuse train                      # the built-in demo (tiny model, bundled data, CPU)
Overrides are dotted keys with YAML values: lora.targets=[q_proj,v_proj]  train.max_steps=null
A run resumes from the latest checkpoint in output.dir unless --no-resume.""",
    "preview": """Example:
  lorafuse data preview examples/llama2-7b-dolly-ja-qlora.yaml -n 3 data.max_length=1024
Shows rendered rows with trained and masked tokens, truncation and length statistics.""",
    "generate": """Examples:
  lorafuse generate --model builtin:tiny-llama --adapter runs/demo/adapter \\
      --prompt "英語に翻訳してください: 白い馬が寝ています。"
  lorafuse generate --model meta-llama/Llama-2-7b-hf --adapter runs/dolly-ja/adapter \\
      --prompt "日本の首都はどこですか？" --max-new-tokens 128
The prompt is rendered the way the adapter was trained (its lorafuse.json: format, chat template, system prompt);
--raw sends it as written.""",
    "chat": """Examples:
  lorafuse chat --model builtin:tiny-llama --adapter runs/demo/adapter
  lorafuse chat --model meta-llama/Meta-Llama-3-8B-Instruct --adapter runs/llama3-chat/adapter --quant none""",
    "merge": """Example:
  lorafuse merge --model meta-llama/Llama-2-7b-hf --adapter runs/dolly-ja/adapter --out runs/dolly-ja/merged
The base is dequantized, the adapter added in float32, and the result saved in --dtype; the merged model's
logits are checked against base+adapter unless --no-check.""",
    "export": """Examples:
  lorafuse export --model meta-llama/Llama-2-7b-hf --adapter runs/dolly-ja/adapter --out dolly-ja-q8_0.gguf \\
      --quant q8_0 --ollama                 # one GGUF file + dolly-ja-q8_0.Modelfile for `ollama create`
  lorafuse export --model BASE --adapter ADAPTER --out adapter.gguf --lora-only     # for llama.cpp --lora
  lorafuse export --model BASE --adapter ADAPTER --out merged/ --format hf           # a folder for vLLM
GGUF types (--quant):{types}
k-quants (q4_k_m, ...): export f16, then llama.cpp's llama-quantize.""",
    "env": """Example:
  lorafuse env          # paste the output into bug reports""",
    "plan": """Example:
  lorafuse plan examples/llama2-7b-dolly-ja-qlora.yaml --gpu-memory 15GiB
Estimates memory (weights, optimizer, activations, logits) and says whether the run fits.""",
    "ui": """Example:
  lorafuse ui --runs runs          # then open http://127.0.0.1:7860
The page lists the runs under --runs, builds a run config from a form, starts, stops and resumes
`lorafuse train`, plots its metrics live and chats with the adapter. Needs: pip install 'lorafuse[ui]'.""",
    "bench": """Example:
  lorafuse bench -- --help      # the benchmark runner's own options
All arguments after `bench` go to the benchmark harness (benchmarks/bench.py of a source checkout).""",
}


def _number(kind, lo: float, hi: float | None = None, lo_open: bool = False):
    """An argparse type: `kind` (int or float), finite (no inf, nan), >= lo (> lo with lo_open), <= hi if given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        low_ok = value > lo if lo_open else value >= lo
        if not (low_ok and (hi is None or value <= hi) and math.isfinite(value)):
            allowed = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "") + ", finite"
            raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: {allowed})")
        return value

    return parse


_SEED = _number(int, 0, 2**32 - 1)


def _add_inference_args(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    p.add_argument("--model", required=True, help="base model: hub id or folder (the one the adapter was trained on)")
    p.add_argument("--adapter", help="adapter folder written by `lorafuse train` (or peft)")
    p.add_argument(
        "--quant",
        choices=["nf4", "none"],
        default=None,
        help="load the base in NF4 or unquantized (default: as the adapter was trained, else nf4)",
    )
    p.add_argument(
        "--compute-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="matmul dtype (default: auto)",
    )
    p.add_argument("--max-new-tokens", type=_number(int, 1), default=256, help="default: 256")
    p.add_argument("--system", default=None, help="system prompt (default: the one the adapter was trained with)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the text as written, without the chat template the adapter was trained with",
    )
    p.add_argument(
        "--temperature", type=_number(float, 0), default=temperature, help=f"0 = greedy (default: {temperature})"
    )
    p.add_argument(
        "--top-p",
        type=_number(float, 0, 1, lo_open=True),
        default=top_p,
        help=f"nucleus sampling threshold (default: {top_p})",
    )


_FMT = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in lorafuse's form: "error: ..." and a fix line (exit status 2)."""

    def error(self, message: str):
        print(f"error: {message}\n  fix: see `{self.prog} --help`", file=sys.stderr)
        self.exit(2)


def _add(parent, name: str, help_text: str, usage: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with its example epilog and the --debug flag (also accepted after the command); its
    `func` default names the command (lorafuse.cli.COMMANDS)."""
    p = parent.add_parser(
        name, help=help_text, description=help_text, usage=usage, epilog=_EPILOG.get(name), formatter_class=_FMT
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
    p.set_defaults(func=name)
    return p


def _add_items(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG key=value",
        help="a YAML config (default: the built-in demo), then dotted-key overrides",
    )


def _add_config_commands(sub) -> None:
    """Commands that take a run config: train, data preview, plan."""
    p = _add(
        sub,
        "train",
        "train an adapter from a YAML config",
        usage="lorafuse train [CONFIG] [key=value ...] [--resume PATH | --no-resume] [--force] [--debug]",
    )
    _add_items(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        metavar="PATH",
        help="resume from this checkpoint folder (default: the latest checkpoint in output.dir, if any)",
    )
    group.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even when the checkpoint's config or training data differs from this run's",
    )

    data = sub.add_parser(
        "data",
        help="inspect training data",
        description="inspect training data",
        epilog=_EPILOG["preview"],
        formatter_class=_FMT,
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    p = _add(
        data_sub,
        "preview",
        "show rendered rows, masks and length statistics",
        usage="lorafuse data preview [CONFIG] [key=value ...] [-n N] [--debug]",
    )
    _add_items(p)
    p.add_argument("-n", type=_number(int, 1), default=5, help="rows to show (default: 5)")

    p = _add(
        sub,
        "plan",
        "estimate memory and check that a run fits before using a GPU",
        usage="lorafuse plan [CONFIG] [key=value ...] [--gpu-memory SIZE] [--gpu NAME] [--json] [--debug]",
    )
    _add_items(p)
    p.add_argument(
        "--gpu-memory", metavar="SIZE", help="plan for this much GPU memory, e.g. 15GiB (default: the visible GPU)"
    )
    p.add_argument("--gpu", metavar="NAME", help="the card, for the speed estimate, e.g. T4 or A100-80GB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_model_commands(sub) -> None:
    """Commands that take a model (+ adapter): generate, chat, merge."""
    p = _add(sub, "generate", "generate text from a base model (+ adapter)")
    _add_inference_args(p, temperature=0.0, top_p=1.0)
    p.add_argument(
        "--prompt", required=True, help="the user message, rendered in the format the adapter was trained with"
    )
    p.add_argument("--input", default=None, help="the Input block of alpaca-style formats (the instruction's input)")
    p.add_argument("--seed", type=_SEED, default=None, help="seed for sampling (0 to 2**32-1)")

    p = _add(sub, "chat", "chat with a base model (+ adapter) in the terminal")
    _add_inference_args(p, temperature=0.7, top_p=0.9)

    p = _add(sub, "merge", "merge an adapter into its base and save a 16-bit model")
    p.add_argument("--model", required=True, help="base model: hub id or folder")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the saved model (default: bfloat16)",
    )
    p.add_argument(
        "--from-16bit",
        action="store_true",
        help="add the adapter to the original 16-bit base "
        "weights instead of the dequantized NF4 weights it was trained against",
    )
    p.add_argument("--no-check", action="store_true", help="skip the logit check of the merged model")


def _add_export_command(sub) -> None:
    from lorafuse.artifacts.gguf_tensors import QUANT_TYPES  # no heavy imports: a table

    p = _add(sub, "export", "export base + adapter as a GGUF file (llama.cpp, Ollama) or a merged folder")
    p.epilog = _EPILOG["export"].format(
        types="".join(f"\n  {name:<6} {help_line}" for name, (_, _, help_line) in QUANT_TYPES.items())
    )
    p.add_argument("--model", required=True, help="base model: hub id or folder (the one the adapter was trained on)")
    p.add_argument("--adapter", help="adapter folder (without it: the base alone, e.g. for --lora-only's base)")
    p.add_argument("--out", required=True, help="FILE.gguf (--format gguf) or a folder (--format hf)")
    p.add_argument("--format", choices=["gguf", "hf"], default="gguf", help="default: gguf")
    p.add_argument(
        "--quant",
        choices=list(QUANT_TYPES),
        default=None,
        help="weight type: gguf default f16; hf takes f32/f16/bf16 (default bf16). Listed below",
    )
    p.add_argument("--ollama", action="store_true", help="also write <out>.Modelfile for `ollama create`")
    p.add_argument("--lora-only", action="store_true", help="write the adapter alone as a llama.cpp LoRA GGUF")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lorafuse", description="Fast LoRA and QLoRA fine-tuning.", epilog=_EPILOG["main"], formatter_class=_FMT
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_config_commands(sub)
    _add_model_commands(sub)
    _add_export_command(sub)
    _add(sub, "env", "print versions, GPUs and the dtype `auto` picks")
    p = _add(sub, "ui", "serve a local web page to set up, run, watch and try fine-tunes")
    p.add_argument("--runs", default="runs", help="the folder of run folders to list and start runs in (default: runs)")
    p.add_argument("--port", type=_number(int, 1, 65535), default=7860, help="1 to 65535 (default: 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    _add(
        sub,
        "bench",
        "run benchmarks (arguments pass through to the benchmark runner)",
        usage="lorafuse bench [ARGS ...]",
    )
    return parser

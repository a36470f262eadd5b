"""The `lorafuse` command: parse arguments, call one function per subcommand, report errors.

No logic lives here beyond parsing (the parser: lorafuse/cli_parser.py). Heavy modules (torch, transformers,
pydantic) are imported inside the command functions so `lorafuse --help` answers instantly. A `LorafuseError` (a
problem the user can fix) prints as "error: ... / fix: ..." on stderr with exit status 2 and no traceback unless
`--debug` (accepted before or after the subcommand); Ctrl-C exits with 130. `main` is the one exception boundary: what
a library raises for a fault the user can fix (a full disk, an unreadable file, out of memory) becomes such an error
too (lorafuse.io_errors.translate); anything else is a bug in lorafuse and prints one line that says so, exit 1.
Bad option values (a negative --max-new-tokens) are refused by the parser, in the same two-line form.
"""

from __future__ import annotations

import os
import shlex
import sys

from lorafuse.cli_parser import build_parser
from lorafuse.errors import ConfigError, LorafuseError


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG] [key=value ...] -> (config path or None, overrides)."""
    config = None
    if items and ("=" not in items[0] or os.path.isfile(items[0])):
        config, items = items[0], items[1:]
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"argument {item!r} is not a key=value override",
                "only the first argument may be a config file; write overrides as key=value, e.g. lora.r=32",
            )
    return config, items


def _load(args):
    from lorafuse.config import load_config

    config, overrides = _split_items(args.items)
    return load_config(config, overrides)


def _check_hub(*sources: tuple) -> None:
    """Offline, a hub id that is not in the local cache fails here, before the heavy imports (lorafuse.hub)."""
    from lorafuse.hub import check_hub_ids

    check_hub_ids(list(sources))


def _config_sources(cfg) -> tuple:
    return (
        (cfg.model.path, "model", "model.path"),
        (cfg.data.path, "dataset", "data.path"),
        (cfg.data.val_path, "dataset", "data.val_path"),
    )


def cmd_train(args) -> int:
    cfg = _load(args)  # config errors first, before any heavy import
    _check_hub(*_config_sources(cfg))
    from lorafuse.job import run

    resume = None if args.no_resume else (args.resume or "auto")
    result = run(cfg, resume=resume, force=args.force)
    return getattr(result, "exit_code", 0)  # 130 / 143 after a checkpoint saved on SIGINT / SIGTERM


def cmd_preview(args) -> int:
    cfg = _load(args)
    _check_hub(*_config_sources(cfg))
    from lorafuse.preview import preview

    preview(cfg, n=args.n)
    return 0


def _load_for_inference(args):
    _check_hub((args.model, "model", "--model"))
    import lorafuse
    from lorafuse.artifacts.adapter_load import trained_quant
    from lorafuse.infer.generate import prompt_note

    if args.raw and (args.system or getattr(args, "input", None)):
        raise ConfigError("--raw sends the text as written, so --system and --input cannot apply", "drop one of them")
    quant = args.quant or trained_quant(args.adapter)
    model, tokenizer = lorafuse.load_model(args.model, quant=quant, compute_dtype=args.compute_dtype)
    if args.adapter:
        model = lorafuse.load_adapter(model, args.adapter)
    note = None if args.raw else prompt_note(model, tokenizer, args.adapter)
    if note:
        print(note, file=sys.stderr)
    return model, tokenizer


def cmd_generate(args) -> int:
    model, tokenizer = _load_for_inference(args)
    import lorafuse
    from lorafuse.infer.generate import user_message

    system = [{"role": "system", "content": args.system}] if args.system else []
    text = lorafuse.generate(
        model,
        tokenizer,
        args.prompt if args.raw else [*system, user_message(args.prompt, args.input)],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        raw=args.raw,
    )
    print(text)
    return 0


def cmd_chat(args) -> int:
    model, tokenizer = _load_for_inference(args)
    from lorafuse.infer.chat import chat_loop

    chat_loop(
        model,
        tokenizer,
        system_prompt=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        raw=args.raw,
    )
    return 0


def cmd_merge(args) -> int:
    _check_hub((args.model, "model", "--model"))
    import lorafuse

    out = lorafuse.merge(
        args.model, args.adapter, args.out, dtype=args.dtype, from_16bit=args.from_16bit, check=not args.no_check
    )
    diff = getattr(out, "max_logit_diff", None)
    print(
        f"merged model written to {out}"
        + (f" (max logit difference vs base+adapter: {diff:.3g})" if diff is not None else "")
    )
    return 0


def cmd_export(args) -> int:
    _check_hub((args.model, "model", "--model"))
    from lorafuse.artifacts.export import export

    export(
        args.model,
        args.adapter,
        args.out,
        format=args.format,
        quant=args.quant,
        ollama=args.ollama,
        lora_only=args.lora_only,
    )
    return 0


def cmd_env(args) -> int:
    from lorafuse.env import print_env

    print_env()
    return 0


def cmd_plan(args) -> int:
    cfg = _load(args)
    from lorafuse.plan.cli import plan_command

    extra = {"gpu": args.gpu} if args.gpu else {}
    command = " ".join(["lorafuse train", *map(shlex.quote, args.items)])  # the suggestion extends it
    rc = plan_command(cfg, gpu_memory=args.gpu_memory, as_json=args.json, train_command=command, **extra)
    return rc if isinstance(rc, int) else 0


def cmd_ui(args) -> int:
    from lorafuse.ui.app import serve

    serve(args.runs, host=args.host, port=args.port)
    return 0


def cmd_bench(argv: list[str]) -> int:
    """The benchmark harness lives in the source checkout (benchmarks/bench.py), beside its peers' runners."""
    import importlib.util
    from pathlib import Path

    harness = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    if not harness.is_file():
        raise LorafuseError(
            "lorafuse bench runs the benchmark harness of a source checkout, and this installation has none",
            "clone the lorafuse repository and run `python benchmarks/bench.py ...` (or `lorafuse bench ...`) there",
        )
    spec = importlib.util.spec_from_file_location("lorafuse_bench_harness", harness)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        rc = module.main(argv)
    except SystemExit as exc:  # the harness's own argparse: --help, usage errors
        rc = exc.code
    return rc if isinstance(rc, int) else 0


COMMANDS = {
    "train": cmd_train,
    "preview": cmd_preview,
    "plan": cmd_plan,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "merge": cmd_merge,
    "export": cmd_export,
    "env": cmd_env,
    "ui": cmd_ui,
}


def _report(err: LorafuseError) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process fails alike: print the error once
        return
    from rich.console import Console
    from rich.text import Text

    text = Text(f"error: {err.problem}", style="bold red")
    if err.fix:
        text.append(f"\n  fix: {err.fix}", style="red")
    Console(stderr=True, highlight=False).print(text, soft_wrap=True)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "bench" and not {"-h", "--help"} & set(argv[1:2]):
        rest = argv[1:]
        return cmd_bench(rest[1:] if rest[:1] == ["--"] else rest)
    parser = build_parser()
    try:  # argparse exits on --help (0) and usage errors (2); main() returns the status instead
        args, extra = parser.parse_known_args(argv)
        if extra and hasattr(args, "items") and not any(x.startswith("-") for x in extra):
            args.items += extra  # overrides written after an option: `train cfg.yaml --force lora.r=8`
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    command = COMMANDS.get(getattr(args, "func", None))
    if command is None:
        parser.print_help()
        return 2
    from lorafuse.console import quiet_library_progress

    quiet_library_progress()  # lorafuse's progress lines only, no "Loading weights" bars between them
    return command(args)


def _user_error(err: LorafuseError, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    _report(err)
    return 2


def _unexpected(exc: Exception, debug: bool) -> int:
    """A library's fault the user can fix becomes a user error; anything else is a bug: one line, exit 1."""
    from lorafuse.io_errors import translate

    err = translate(exc)
    if err is not None:
        return _user_error(err, debug)
    if debug:
        import traceback

        traceback.print_exc()
    if os.environ.get("RANK", "0") == "0":
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: {type(exc).__name__}: {first}", file=sys.stderr)
        print("this is a bug in lorafuse: run with --debug and report it", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is global: strip it wherever it stands (also for `bench`, whose arguments argparse never sees).
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except LorafuseError as err:
        return _user_error(err, debug)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the boundary: never a bare traceback (see the module docstring)
        return _unexpected(exc, debug)

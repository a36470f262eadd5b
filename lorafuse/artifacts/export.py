"""`lorafuse export` / `lorafuse.export(...)`: a base model + LoRA adapter in the form another tool runs.

    format="gguf"   one GGUF file of the merged model (llama.cpp, Ollama, LM Studio), streamed (artifacts.gguf);
                    lora_only=True writes the adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora`);
                    ollama=True also writes "<out stem>.Modelfile" beside it (artifacts.ollama)
    format="hf"     the merged 16-bit transformers folder (vLLM, transformers): lorafuse.artifacts.merge, verified

What training used travels with the model (CONTRACTS: lorafuse.json, else the adapter's tokenizer, else the base's):
the chat template goes into tokenizer.chat_template, lorafuse.json's "eos_token" is EOS, the end-of-turn token (the
special token the template puts right after an assistant reply, e.g. <|im_end|>) is the GGUF eot, and the Modelfile
stops on both. Without an adapter the base alone is converted (the base GGUF that a --lora-only adapter runs on).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import LorafuseError

FORMATS = ("gguf", "hf")
_HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ExportResult:
    """What export wrote (path-like: os.fspath / Path() work on it)."""

    path: Path
    format: str
    quant: str
    bytes: int
    seconds: float
    modelfile: Path | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def export(
    model,
    adapter=None,
    out=None,
    format: str = "gguf",
    quant: str | None = None,
    ollama: bool = False,
    lora_only: bool = False,
    console=None,
) -> ExportResult:
    """Export `model` (base folder or hub id) with `adapter` (folder, or None for the base alone) to `out`.

    quant: gguf: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (see artifacts.gguf_tensors); hf: f32, f16,
    bf16 (default). Raises LorafuseError (exit 2 in the CLI) on bad arguments before loading anything.
    """
    from lorafuse.console import make_console

    console = console or make_console(stderr=True, highlight=False)
    out = _check_args(model, adapter, out, format, quant, ollama, lora_only)
    start = time.perf_counter()
    if format == "hf":
        result = _export_hf(model, adapter, out, quant or "bf16")
    else:
        from lorafuse.artifacts.gguf import check_target

        quant = quant or "f16"
        check_target(out)  # a file: never one lorafuse did not write
        if ollama:
            from lorafuse.artifacts.ollama import modelfile_path

            modelfile_path(out)
        result = (_export_lora if lora_only else _export_gguf)(model, adapter, out, quant, ollama, console)
    seconds = time.perf_counter() - start
    result = ExportResult(result.path, format, result.quant, result.bytes, seconds, result.modelfile)
    what = "LoRA adapter" if lora_only else "merged model" if adapter else "model"
    console.print(
        f"exported the {what} to {result.path} ({_size(result.bytes)}, {result.quant}) in {result.seconds:.1f} s"
        + (f"; Ollama: ollama create {result.path.stem} -f {result.modelfile}" if result.modelfile else "")
    )
    return result


def _check_args(model, adapter, out, format, quant, ollama, lora_only) -> Path:
    from lorafuse.artifacts.gguf_tensors import check_quant

    if format not in FORMATS:
        raise LorafuseError(f"unknown export format {format!r}", "use --format gguf or --format hf")
    if format == "gguf":
        from lorafuse.artifacts.gguf import import_gguf

        import_gguf()  # the missing package is a clear error before anything else
    if out is None:
        raise LorafuseError("no output path given", "pass --out model.gguf (gguf) or --out DIR (hf)")
    if (lora_only or format == "hf") and adapter is None:
        raise LorafuseError(
            f"{'--lora-only' if lora_only else '--format hf'} needs an adapter", "pass --adapter DIR (the trained one)"
        )
    if format == "hf":
        if lora_only or ollama:
            raise LorafuseError(
                "--lora-only and --ollama are GGUF options", "drop them, or use --format gguf --out FILE.gguf"
            )
        if quant is not None and quant not in _HF_DTYPES:
            raise LorafuseError(
                f"--format hf saves 16/32-bit weights, not {quant}", f"use --quant {' | '.join(_HF_DTYPES)}"
            )
    else:
        check_quant(quant or "f16")
        if ollama and lora_only:
            raise LorafuseError(
                "--ollama writes a Modelfile for a merged GGUF model, not for a LoRA adapter",
                "drop --lora-only (Ollama then runs the merged model), or drop --ollama",
            )
    return Path(out).expanduser()  # --format hf: merge checks the folder (lorafuse.outputs.check_output_dir)


def _export_hf(model, adapter, out: Path, quant: str) -> ExportResult:
    from lorafuse.artifacts.merge import merge

    result = merge(model, adapter, out, dtype=_HF_DTYPES[quant])
    size = sum(f.stat().st_size for f in Path(result.path).rglob("*") if f.is_file())
    return ExportResult(Path(result.path), "hf", quant, size, 0.0)


def _export_gguf(model, adapter, out: Path, quant: str, ollama: bool, console) -> ExportResult:
    from lorafuse.artifacts.adapter_load import read_adapter_config, read_lorafuse_facts
    from lorafuse.artifacts.gguf import stored_dtype, write_model_gguf
    from lorafuse.artifacts.merge import end_of_turn_id, load_for_merge, training_tokenizer
    from lorafuse.model.load import resolve_model_path

    facts = {}
    if adapter is not None:
        read_adapter_config(adapter)  # a bad adapter folder fails before the base loads
        facts = read_lorafuse_facts(adapter) or {}
        if not facts:
            warnings.warn(
                f"{adapter} has no lorafuse.json (not saved by lorafuse), so how the base was quantized in training "
                "is unknown: merging into the base weights as stored",
                stacklevel=3,
            )
    trained = facts.get("base") or {"quant": "none"}
    folder = resolve_model_path(str(model))
    base, tokenizer = load_for_merge(
        folder, adapter, trained, nf4=trained.get("quant") == "nf4", dense_dtype=stored_dtype(folder), upcast=False
    )
    if adapter is not None:
        tokenizer = training_tokenizer(adapter, tokenizer)
    if facts.get("chat_template"):
        tokenizer.chat_template = facts["chat_template"]
    if facts.get("eos_token") and facts["eos_token"] in tokenizer.get_vocab():
        tokenizer.eos_token = facts["eos_token"]
    template = getattr(tokenizer, "chat_template", None)
    eot = end_of_turn_id(tokenizer)
    if ollama:  # translated before the GGUF is written, so a template it cannot translate costs nothing
        from lorafuse.artifacts.ollama import modelfile_text, write_modelfile

        text = modelfile_text(out.name, tokenizer, template, facts.get("system_prompt"), eot)
    written = write_model_gguf(base, tokenizer, out, quant, template, eot, name=_name(model, adapter), console=console)
    del base
    modelfile = write_modelfile(out, text) if ollama else None
    return ExportResult(written.path, "gguf", quant, written.bytes, written.seconds, modelfile)


def _export_lora(model, adapter, out: Path, quant: str, ollama: bool, console) -> ExportResult:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lorafuse.artifacts.adapter_io import WEIGHTS_NAME
    from lorafuse.artifacts.adapter_load import read_adapter_config, read_lorafuse_facts
    from lorafuse.artifacts.gguf import write_lora_gguf
    from lorafuse.model.load import resolve_model_path

    cfg = read_adapter_config(adapter)
    weights = Path(adapter).expanduser() / WEIGHTS_NAME
    if not weights.is_file():
        raise LorafuseError(f"{adapter} has no {WEIGHTS_NAME}", "pass the folder that save_adapter wrote")
    trained = (read_lorafuse_facts(adapter) or {}).get("base") or {}
    if trained.get("quant") == "nf4":
        console.print(
            "note: this adapter was trained on the NF4 4-bit base; llama.cpp applies it to whatever base GGUF you "
            "load, so the trained function is reproduced exactly only by the merged export (drop --lora-only)"
        )
    config = AutoConfig.from_pretrained(resolve_model_path(str(model)))
    written = write_lora_gguf(config, cfg, load_file(str(weights)), out, quant, _name(model, adapter), console)
    return ExportResult(written.path, "gguf", quant, written.bytes, written.seconds)


def _name(model, adapter) -> str:
    """general.name: the base's name + the run's name (the adapter folder's, or its parent's for .../adapter)."""
    base = Path(str(model).rstrip("/")).name
    if adapter is None:
        return base
    folder = Path(adapter).expanduser().resolve()
    return f"{base} + {folder.parent.name if folder.name == 'adapter' else folder.name}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"

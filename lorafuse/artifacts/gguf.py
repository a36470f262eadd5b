"""GGUF files for llama.cpp, Ollama and LM Studio: the merged model streamed tensor by tensor, or the adapter alone.

Merged model (`write_model_gguf`). The base is loaded as training saw it (an NF4-trained adapter: the same 4-bit codes;
otherwise the stored 16-bit weights, one copy), the adapter put on it, and then per tensor:

    W' = dequantize(W) + s * B @ A        fp32 (lorafuse.artifacts.merge.merged_weight; DoRA rescales rows)
    W' -> q/k rows reordered for llama.cpp's rope (gguf_arch) -> encoded in the requested type (gguf_tensors)
       -> written with gguf's GGUFWriter (header, metadata and tensor table first, then each tensor's bytes) -> freed

so a 4-bit base is never re-quantized from its 4-bit values to another grid without the update, and host memory
holds the loaded base plus one fp32 matrix and its encoding (a 7B NF4 base: about 4 GB; a 16-bit one: about 14 GB).
Metadata: the architecture's hyperparameters (gguf_arch), the vocabulary, special ids and the chat template training
used (gguf_vocab), general.file_type, and `lorafuse.version`, which marks the file as ours.

Adapter alone (`write_lora_gguf`): llama.cpp's LoRA format (general.type "adapter", adapter.type "lora",
adapter.lora.alpha; tensors "<gguf name>.lora_a" (r, in) and ".lora_b" (out, r) in numpy order). llama.cpp scales
each pair by alpha / r with r read from the tensor; lorafuse writes alpha = s * r of the most common layer and folds
any other layer's ratio into its B, so rsLoRA and per-layer rank/alpha patterns apply exactly. B's rows of attn_q /
attn_k are reordered like the base weights. DoRA and modules_to_save cannot be expressed in that format (refused).

Files are written under a temporary name beside the target and renamed at the end, so a crash never leaves a partial
file under the final name; an existing file is replaced only if it is a GGUF file lorafuse wrote.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafuse.artifacts import gguf_arch, gguf_tensors
from lorafuse.atomic import fsync_path
from lorafuse.errors import LorafuseError, ModelError
from lorafuse.version import __version__

MARK_KEY = "lorafuse.version"  # metadata key that says lorafuse wrote the file (and may replace it)
_PROGRESS_BYTES = 256 * 2**20  # show a progress bar from this output size up


@dataclass(frozen=True)
class GGUFWritten:
    path: Path
    bytes: int
    tensors: int
    seconds: float


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise LorafuseError(
            "GGUF export needs the `gguf` package (llama.cpp's GGUF writer)",
            "pip install 'lorafuse[export]'  (or: pip install gguf)",
        ) from None
    return gguf


def check_target(out: Path) -> Path:
    """Refuse (exit 2, before any work) an existing --out that is not a GGUF file lorafuse wrote (lorafuse.outputs)."""
    from lorafuse.outputs import check_output_file

    return check_output_file(out, "export", lorafuse_wrote)


def lorafuse_wrote(path: Path) -> bool:
    gguf = import_gguf()
    try:
        return MARK_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file (or a damaged one): either way, not ours to replace
        return False


@contextlib.contextmanager
def _temp_beside(out: Path):
    """A temp path in `out`'s folder; renamed over `out` (after fsync) on success, removed on any failure (disk full,
    read-only, no permission: reported for `out`, as lorafuse.atomic.write_atomic does)."""
    from lorafuse.io_errors import write_error

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        converted = write_error(exc, out, setting="--out") if isinstance(exc, OSError) else None
        if converted is not None:
            raise converted from exc
        raise
    fsync_path(out.parent)


def _start(arch_name: str, file_type: int, name: str | None, kind: str):
    gguf = import_gguf()
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    if name:
        writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(MARK_KEY, __version__)
    writer.add_string("lorafuse.kind", kind)
    return writer


def _write(writer, out: Path, plan: list, console) -> GGUFWritten:
    """Write the tensor table, then each tensor's bytes in plan order: plan = [(name, shape, qtype, make)]."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    start = time.perf_counter()
    for name, shape, qtype, _ in plan:  # np.float32 (not uint8): `shape` is read as the element shape, not bytes
        writer.add_tensor_info(name, shape, np.float32, gguf_tensors.nbytes(shape, qtype), raw_dtype=qtype)
    total = sum(gguf_tensors.nbytes(shape, qtype) for _, shape, qtype, _ in plan)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with (
        _temp_beside(out) as tmp,
        Progress(*columns, console=console, transient=True, disable=total < _PROGRESS_BYTES) as bar,
    ):
        task = bar.add_task(f"writing {out.name}", total=total)
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for *_, make in plan:
                data = make()  # merged, reordered, encoded: one tensor alive at a time
                writer.write_tensor_data(data)
                bar.advance(task, data.nbytes)
                del data
        finally:
            writer.close()
    return GGUFWritten(out, out.stat().st_size, len(plan), time.perf_counter() - start)


def write_model_gguf(model, tokenizer, out: Path, quant: str, chat_template, eot_id, name=None, console=None):
    """Stream `model` (a loaded base, with or without a LoRA adapter on it) into one GGUF file (module docstring)."""
    arch = gguf_arch.arch_of(model.config)
    plan = []
    for hf_name, shape, make in gguf_tensors.merged_tensors(model):
        gname = arch.gguf_name(hf_name)
        qtype = gguf_tensors.tensor_type(gname, shape, quant)
        plan.append((gname, shape, qtype, _encoder(arch, gname, make, qtype)))
    freqs = gguf_arch.rope_freqs(arch)
    if freqs is not None:
        qtype = gguf_tensors.tensor_type("rope_freqs.weight", tuple(freqs.shape), quant)
        plan.append(("rope_freqs.weight", tuple(freqs.shape), qtype, lambda: gguf_tensors.encode(freqs, qtype)))
    rows = {gname: shape[0] for gname, shape, _, _ in plan if gname in ("token_embd.weight", "output.weight")}
    if len(set(rows.values())) != 1:
        raise ModelError(
            f"the token embedding and output head have different row counts ({rows})",
            "resize both to the tokenizer's size (model.resize_token_embeddings) before training",
        )
    writer = _start(arch.name, gguf_tensors.file_type(quant), name, "model")
    gguf_arch.write_hparams(writer, arch, rows["token_embd.weight"])
    from lorafuse.artifacts.gguf_vocab import write_vocab

    write_vocab(writer, tokenizer, rows["token_embd.weight"], chat_template, eot_id)
    return _write(writer, out, plan, console)


def _encoder(arch, gname: str, make, qtype):
    return lambda: gguf_tensors.encode(arch.to_gguf_rows(gname, make()), qtype)


def write_lora_gguf(config, adapter_cfg: dict, tensors: dict, out: Path, quant: str, name=None, console=None):
    """The adapter alone in llama.cpp's LoRA format (module docstring); tensors: the adapter file's, by PEFT key."""
    from lorafuse.artifacts.adapter_io import PREFIX
    from lorafuse.artifacts.adapter_load import (
        _pattern_value,  # peft's rank/alpha pattern rule, as load_adapter uses it
    )

    if quant not in ("f32", "f16", "bf16", "q8_0"):
        raise LorafuseError(
            f"--lora-only writes f32, f16, bf16 or q8_0 LoRA tensors, not {quant}",
            "pass --quant f16 (the adapter is small; the base GGUF carries the low-bit weights)",
        )
    _check_plain_lora(adapter_cfg, tensors)
    arch = gguf_arch.arch_of(config)
    layers = sorted(k[len(PREFIX) : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    scale = {}
    for layer in layers:
        r = tensors[f"{PREFIX}{layer}.lora_A.weight"].shape[0]
        alpha = float(_pattern_value(adapter_cfg["alpha_pattern"], layer, adapter_cfg["lora_alpha"]))
        scale[layer] = (r, alpha / (r**0.5 if adapter_cfg["use_rslora"] else r))
    pairs = list(scale.values())
    r_ref, s_ref = max(set(pairs), key=pairs.count)
    alpha_out = s_ref * r_ref  # llama.cpp multiplies by alpha / r
    plan = []
    for layer in layers:
        gname = arch.gguf_name(f"{layer}.weight")
        a = tensors[f"{PREFIX}{layer}.lora_A.weight"].float()
        b = tensors[f"{PREFIX}{layer}.lora_B.weight"].float()
        r, s = scale[layer]
        b = arch.to_gguf_rows(gname, b * (s / (alpha_out / r)))
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            qtype = gguf_tensors.tensor_type(gname + suffix, tuple(t.shape), quant)
            plan.append((gname + suffix, tuple(t.shape), qtype, lambda t=t, q=qtype: gguf_tensors.encode(t, q)))
    writer = _start(arch.name, gguf_tensors.file_type(quant), name, "lora")
    writer.add_type("adapter")
    writer.add_string(import_gguf().Keys.Adapter.TYPE, "lora")
    writer.add_float32(import_gguf().Keys.Adapter.LORA_ALPHA, float(alpha_out))
    return _write(writer, out, plan, console)


def _check_plain_lora(cfg: dict, tensors: dict) -> None:
    """llama.cpp's LoRA format holds A/B pairs only: refuse adapters that also carry something else."""
    why = None
    if cfg.get("use_dora"):
        why = "it is a DoRA adapter (a magnitude vector rescales each merged row)"
    elif cfg.get("modules_to_save") or any(not (".lora_A." in k or ".lora_B." in k) for k in tensors):
        why = "it also trained whole modules (modules_to_save), which a llama.cpp LoRA file cannot replace"
    elif cfg.get("trainable_token_indices"):
        why = "it trained token rows, which a llama.cpp LoRA file cannot hold"
    if why:
        raise LorafuseError(
            f"this adapter cannot be exported for llama.cpp's --lora: {why}",
            "export the merged model instead (drop --lora-only)",
        )


def stored_dtype(folder: str) -> torch.dtype:
    """The dtype the checkpoint's config.json declares for its weights (16-bit stays 16-bit; anything else fp32)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32

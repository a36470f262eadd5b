"""`lorafuse env`: the versions and devices a bug report needs, and the dtype `auto` resolves to.

Versions are read from package metadata, not by importing (bitsandbytes and triton print or fail on import
when CUDA is misconfigured, which is exactly when this command is run). torch is imported to list devices;
if that fails the report says so instead of crashing. bf16 support is per device: compute capability >= 8.0
(Ampere) has native bf16; a T4 (7.5) or V100 (7.0) trains in float16.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = (
    "lorafuse",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "triton",
    "safetensors",
    "tokenizers",
    "datasets",
    "pydantic",
    "accelerate",
)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> tuple[list[str], str]:
    """(one line per CUDA device, a CUDA summary line)."""
    try:
        import torch
    except Exception as exc:  # a broken torch install is what this command must report
        return [], f"torch cannot be imported: {exc}"
    if not torch.cuda.is_available():
        return [], f"not available (torch built with CUDA {torch.version.cuda or 'none'})"
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = "yes" if p.major >= 8 else "no (use float16)"
        lines.append(
            f"cuda:{i}  {p.name}  {p.total_memory / 2**30:.1f} GiB  compute capability "
            f"{p.major}.{p.minor}  bf16: {bf16}"
        )
    return lines, f"available, torch built with CUDA {torch.version.cuda}"


def _auto_dtype() -> str:
    try:
        from lorafuse.model.load import resolve_compute_dtype

        return str(resolve_compute_dtype("auto")).replace("torch.", "")
    except Exception as exc:  # report, don't crash: env must work on a half-broken install
        return f"unknown ({type(exc).__name__}: {exc})"


def env_report() -> str:
    """The report as plain text (pasteable into an issue)."""
    lines = [f"python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {_version(name)}" for name in PACKAGES]
    devices, cuda = _devices()
    lines.append(f"cuda: {cuda}")
    lines += [f"  {d}" for d in devices]
    lines.append(f"compute_dtype auto -> {_auto_dtype()}")
    return "\n".join(lines)


def print_env() -> None:
    print(env_report())

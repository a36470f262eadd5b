"""Tensor types of the GGUF export, and the merged model's tensors one at a time.

Types (the `--quant` choices), each encoded by gguf's own Python quantizers (gguf.quants):
    f32, f16, bf16            every matrix in that type (f16/bf16: round to nearest even, as torch/numpy cast)
    q8_0                      blocks of 32 weights: d = max|w| / 127 stored as f16, codes q = round(w / d) in int8
    q5_1, q5_0, q4_1, q4_0    blocks of 32 with 5- or 4-bit codes (_1: a scale and a minimum, _0: a scale); the token
                              embedding and the output head stay q8_0 (every token goes through them)
The k-quants (q4_k_m, ...) and i-quants have no Python quantizer in gguf: llama.cpp's `llama-quantize` makes them from
an f16 export. 1-D tensors (norms, biases, rope_freqs) are always f32, as llama.cpp computes them. A matrix whose rows
are not a multiple of the block size (32) is written f16, since no block type can hold it.

Streaming: `merged_tensors(model)` yields (hf_name, shape, make): make() computes that tensor of the merged model in
fp32 only when called (a LoRA layer: lorafuse.artifacts.merge.merged_weight, W + s·B@A on the fp32-dequantized base), so
the caller can convert, write and drop it before the next one: host memory holds the loaded base plus one matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from math import prod

from lorafuse.errors import ModelError

# --quant name -> (GGMLQuantizationType member, LlamaFileType member, --help line); importing this module stays light
# (no torch, numpy or gguf) because the CLI lists the types in --help
QUANT_TYPES = {
    "f32": ("F32", "ALL_F32", "32-bit float: exact, 4 bytes per weight"),
    "f16": ("F16", "MOSTLY_F16", "16-bit float (default): 2 bytes per weight"),
    "bf16": ("BF16", "MOSTLY_BF16", "bfloat16: 2 bytes per weight, the range of f32"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", "8-bit blocks of 32: 1.06 bytes per weight, near f16 quality"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1", "5-bit blocks with scale and minimum: 0.75 bytes per weight"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0", "5-bit blocks: 0.69 bytes per weight"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1", "4-bit blocks with scale and minimum: 0.63 bytes per weight"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", "4-bit blocks: 0.56 bytes per weight"),
}
_LOW_BIT = {"q5_1", "q5_0", "q4_1", "q4_0"}
_KEEP_Q8 = ("token_embd.weight", "output.weight")  # stay q8_0 under the 4/5-bit types


def check_quant(quant: str) -> str:
    if quant not in QUANT_TYPES:
        raise ModelError(
            f"GGUF type {quant!r} is not one lorafuse can write",
            f"use one of {', '.join(QUANT_TYPES)}; for k-quants (q4_k_m, q5_k_m, ...) export f16 and run "
            "llama.cpp's `llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`",
        )
    return quant


def ggml_type(quant: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, QUANT_TYPES[check_quant(quant)][0])


def file_type(quant: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, QUANT_TYPES[check_quant(quant)][1]))


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str):
    """The GGML type one tensor is written in under `--quant quant` (see module docstring)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return types.F32
    if quant in _LOW_BIT and gguf_name in _KEEP_Q8:
        quant = "q8_0"
    qtype = ggml_type(quant)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else types.F16


def nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return prod(shape) // block * size


def encode(tensor, qtype):
    """fp32 torch tensor -> the numpy array of what GGUF stores for `qtype` (values, or block bytes)."""
    import gguf
    import numpy as np
    import torch

    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def merged_tensors(model) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
    """(HF name, shape, make) for every parameter of the merged model, in module order; make() gives fp32.

    A LoRA or NF4 linear yields its merged dense weight (and bias) instead of its parts; a parameter shared by two
    modules (tied embedding / head) is yielded once, under the first name.
    """
    from lorafuse.artifacts.merge import merged_weight
    from lorafuse.lora.linear import LoRALinear, NF4Linear

    seen: set[int] = set()
    folded: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") for f in folded):
            continue  # lora_A / lora_B inside a LoRA layer: already in its merged weight
        if isinstance(module, (LoRALinear, NF4Linear)):
            folded.append(name)
            shape = (module.out_features, module.in_features)
            yield f"{name}.weight", shape, lambda m=module: merged_weight(m)
            if module.bias is not None:
                yield f"{name}.bias", tuple(module.bias.shape), lambda b=module.bias: b.detach().float()
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield f"{name}.{pname}" if name else pname, tuple(p.shape), lambda p=p: p.detach().float()

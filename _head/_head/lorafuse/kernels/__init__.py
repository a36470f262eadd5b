"""Fused Triton kernels for LoRA / QLoRA training, each beside a PyTorch reference with its signature.

    nf4_dequant.py   nf4_dequantize(w, dtype, out)           NF4Weight -> dense, bit-exact vs dequantize()
    lora_linear.py   lora_linear(x, LoRAWeights)             y = x W^T + b + s (drop(x) A^T) B^T, W dense or NF4
    lora_group.py    lora_linear_group(x, [q, k, v])         projections of one input: one base GEMM (NF4)
    lora_gemm.py     (Triton GEMMs used by lora_linear: base + rank-r in one accumulator, NF4 in-tile,
                      dropout fused into x A^T and into dA)
    rmsnorm.py       rms_norm(x, w, eps)
    rope.py          apply_rope(q, k, cos, sin)              Q and K in one kernel, GQA
    swiglu_mlp.py    swiglu(g, u), swiglu_mlp(x, gate, up, down)   whole LoRA MLP as one autograd Function
    cross_entropy.py fused_linear_cross_entropy(h, W, y)     chunked over tokens, no (T, V) logits
    fast_path.py     apply_fast_path(model) -> (applied, reason), maybe_apply_fast_path(model, mode)
    reference.py     the PyTorch references (the CPU path) and LoRAWeights

Every public op runs its kernel on CUDA tensors and its reference on CPU tensors (`_runtime.py`).
Import ops from their modules (`from lorafuse.kernels.fast_path import apply_fast_path`); this package
imports nothing, so `import lorafuse.kernels` does not import Triton.
"""

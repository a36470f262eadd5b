"""Fused Triton kernels for LoRA / QLoRA training, each beside a PyTorch reference with its signature.

    nf4_dequant.py   nf4_dequantize(w, dtype, out)           NF4Weight -> dense, bit-exact vs dequantize()
    lora_linear.py   lora_linear(x, LoRAWeights)             y = x W^T + b + s (drop(x) A^T) B^T, W dense or NF4
    lora_gemm.py     (Triton GEMMs used by lora_linear: dropout fused into x A^T, into dA and into dX's rank-r term)
    lora_grad_sb.py  grad_s_b(dy, s, sB, scaling)            dS and dB from one read of dY (experimental.fused_ds_db)
    fp8.py           (e4m3 base GEMMs used by lora_linear: train.fp8)
    rmsnorm.py       rms_norm(x, w, eps)
    rope.py          apply_rope(q, k, cos, sin)              Q and K in one kernel, GQA
    swiglu_mlp.py    swiglu(g, u), swiglu_mlp(x, gate, up, down)   whole LoRA MLP as one autograd Function
    cross_entropy.py fused_linear_cross_entropy(h, W, y)     chunked over tokens, no (T, V) logits
    streamed_head.py streamed_head_cross_entropy(h, y, chunks, ...)   the head arriving in vocabulary chunks
    adamw8bit.py     adamw8bit_update, adamw8bit_multi_update   block-wise 8-bit AdamW, many parameters a launch
    reference.py     the PyTorch references (the CPU path) and LoRAWeights
    _runtime.py      where a kernel runs (Triton on CUDA, the reference on CPU) and how it is launched

Every public op runs its kernel on CUDA tensors and its reference on CPU tensors (`_runtime.py`).
Import ops from their modules (`from lorafuse.kernels.rmsnorm import rms_norm`); this package
imports nothing, so `import lorafuse.kernels` does not import Triton.
"""

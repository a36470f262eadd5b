"""Activations of one LoRA/QLoRA training step: what a decoder layer saves for its backward, what checkpointing
keeps of it, and the buffers one layer's backward and forward allocate (notation: plan/memory.py).

Saved activations of one Llama layer with LoRA, per token, reference path (transformers ops + LoRALinear),
derived from what each op's autograd node keeps (PyTorch saves an input only if a gradient needs it; every
base weight is frozen, so a base matmul saves nothing and an NF4 matmul keeps only the NF4Weight object):
  * 2 RMSNorms: transformers casts x to fp32; pow() saves that copy: 2 x 4D. (rsqrt's (N,1) output: ~0.)
  * each LoRA linear of input width d_in: x.to(fp32) feeds lora_A, which saves it (l d_in); with dropout > 0
    dropout's output is saved instead plus a bool mask (l d_in + d_in); lora_B saves x A (l r). q, k and v
    each cast their input separately, so three copies. (If l == c and no dropout, the copy is the shared
    input itself: one tensor per distinct input.) Under autocast (lorafuse's loop and the HF Trainer on a
    GPU) lora_A/lora_B save autocast's c-byte casts instead (c d_in, c r), and autocast keeps a c-byte copy
    of every LoRA weight for the backward (counted with the LoRA parameters). The fused kernels run with
    autocast off and cast A and B per call (transient, r (in + out) elements): no such copy.
  * attention: SDPA/flash saves q (c Dq), k, v (c Dkv each; with a padding mask transformers repeats k/v to
    H heads first: c Dq each), its output (c Dq) and the fp32 logsumexp (4H). RoPE keeps only cos/sin.
    With a padding mask transformers builds one (B, 1, T, T) bool mask (B T^2 bytes, shared) and SDPA keeps
    an additive c-byte copy per layer (c T per token per layer; the flash kernel is then not used).
  * MLP: SiLU saves its input (gate output, c F); act * up saves both factors (c F + c F).
  => no checkpointing, all 7 projections, dropout > 0, l = 4, c = 2, no autocast, no padding mask:
        8D (norms) + 3*5D + 5Dq + 2*5D + 5F (LoRA inputs) + 28r (x A) + 4Dq + 4Dkv + 4H (attention) + 6F (MLP)
     = 42D + 4Dkv + 11F + 28r + 4H bytes per token per layer: Llama-2-7B 303 KiB, x32 layers = 9.5 MiB/token.
  * Full fine-tuning saves each linear's input in c (q/k/v and gate/up share one) and the norms' output.
  * The fused fast path (lorafuse.kernels, train.fast_path) saves the block inputs (c D shared by q/k/v,
    c D for the MLP; o's input is the attention output SDPA already saves: flash and memory-efficient SDPA
    return a transposed view of a (B, T, H, d_h) tensor, so transformers' transpose(1, 2).contiguous() and
    the reshape are no-ops), gate and up outputs (2 c F; SwiGLU is recomputed), q, k, v, out and
    logsumexp, the norms' input + fp32 1/rms (c D + 4 each) and S = x A (c r per linear); no dropout mask.
With checkpointing (non-reentrant, one checkpoint per decoder layer) each layer keeps only its input
hidden state (c D per token); in backward one layer at a time is recomputed, so its full saved set above
exists once, next to the backward's own buffers. The fused RMSNorm saves its input itself, and the recomputed
input_layernorm's input IS the layer input the checkpoint already holds, so the fused recompute adds the saved
set minus c D (HF's RMSNorm saves an fp32 copy, a tensor of its own). With offload the layer inputs sit in
pinned host memory; the GPU keeps two staging buffers and the last layer's input (3 c D per token).

The backward of one layer (estimate): the fp32 LoRA-path gradient of the widest input (l F), three c F
gradients in the MLP (h, SiLU output and the gate/up outputs are not all alive at once) and two residual
gradients (2 c D): (l + 3c) F + 2 c D per token. Fused path (swiglu_mlp.py): the top of a layer's backward
is the MLP's, with all of the layer's recomputed set alive: the incoming gradient (c D), down's input
gradient dh (c F; SwiGLU's backward then writes h, de, dg over dh, e, g in place) and the (M, D) input
gradient of gate + up: c F + 2 c D, and F more with train.fp8's backward (dY's e4m3 codes for gate's dX).
(Recompute's own top, h (c F) and down's output (c D) next to the incoming gradient, is the same size.)
"""

from __future__ import annotations

from lorafuse.plan.placement import kept_layers
from lorafuse.plan.workload import Workload, fp8_backward, targeted


def _lora_input_bytes(w: Workload) -> int:
    """Per token per layer: what the LoRA branches save (inputs in the LoRA dtype, masks, x A)."""
    c, lb = w.compute_bytes, w.lora_bytes
    lins = targeted(w)
    if w.autocast and lb > c:  # lora_A/lora_B save autocast's c-byte casts, one per projection
        lb = c
        if w.dropout == 0:
            return c * sum(lin.in_features for lin in lins) + c * w.r * len(lins)
    xa = lb * w.r * len(lins)
    if lb == c and w.dropout == 0:  # no cast, no dropout: lora_A saves the shared input itself
        groups = {
            "qkv"
            if lin.name in ("q_proj", "k_proj", "v_proj")
            else "mlp"
            if lin.name in ("gate_proj", "up_proj")
            else lin.name: lin.in_features
            for lin in lins
        }
        return c * sum(groups.values()) + xa
    per_in = lb + (1 if w.dropout > 0 else 0)
    return per_in * sum(lin.in_features for lin in lins) + xa


def layer_saved_bytes(w: Workload) -> int:
    """Bytes per token one decoder layer saves for backward without checkpointing (module docstring)."""
    s, c = w.shape, w.compute_bytes
    D, F, Dq = s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim
    Dkv = Dq if w.padded else s.num_kv_heads * s.head_dim
    attention = c * (Dq + 2 * Dkv) + c * Dq + 4 * s.num_heads + (c * w.seq if w.padded else 0)
    if w.kernels == "fused":  # o_proj's input is SDPA's saved output (module docstring): not counted twice
        lora = c * w.r * len(targeted(w)) if w.method != "full" else 0
        return 2 * (c * D + 4) + attention + 2 * c * F + 2 * c * D + lora
    if w.method == "full":
        norms = 2 * (4 * D + c * D)
        return norms + attention + 3 * c * F + c * (2 * D + Dq + F)
    return 2 * 4 * D + attention + 3 * c * F + _lora_input_bytes(w)


def layer_saved_constant_bytes(w: Workload) -> int:
    """Bytes one decoder layer saves whatever the token count: the fused LoRA ops keep the forward's casts of A
    and s B in the compute dtype for the backward (kernels/lora_linear.py), c r (in + out) per projection."""
    if w.kernels != "fused" or w.method == "full":
        return 0
    return w.compute_bytes * w.r * sum(lin.in_features + lin.out_features for lin in targeted(w))


def layer_transient_bytes(w: Workload) -> int:
    """Bytes per token of the buffers one layer's backward allocates (estimate, module docstring)."""
    c, F, D = w.compute_bytes, w.shape.intermediate_size, w.shape.hidden_size  # the FP8 backward: gate's dY codes
    return (c + fp8_backward(w) if w.kernels == "fused" else w.lora_bytes + 3 * c) * F + 2 * c * D


def forward_transient_bytes(w: Workload) -> int:
    """Bytes per token a late layer's forward holds besides what it saves: gate and up outputs and their SwiGLU
    product (3 c F; the reference MLP also the SiLU output; the fused MLP writes the product over the gate output
    in a checkpointed layer), the norm's and the MLP's outputs (2 c D)."""
    c, F, D = w.compute_bytes, w.shape.intermediate_size, w.shape.hidden_size
    in_place = w.kernels == "fused" and w.checkpointing != "off" and kept_layers(w) == 0
    return (2 if in_place else 3 if w.kernels == "fused" else 4) * c * F + 2 * c * D


def saved_bytes(w: Workload) -> tuple[int, int, int]:
    """(activations saved at the end of the forward, the final norm's part of them, one layer's whole saved set)."""
    s, c, n = w.shape, w.compute_bytes, w.tokens
    whole_layer = layer_saved_bytes(w) * n + layer_saved_constant_bytes(w)  # one layer's set, outside a checkpoint
    # The final norm is outside the checkpoints: HF's keeps an fp32 copy of its input, the fused one x and 1/rms.
    final_norm = (c * s.hidden_size + 4 if w.kernels == "fused" else 4 * s.hidden_size) * n
    kept = kept_layers(w)  # layers outside the checkpoints: their whole saved set, not just their input
    if w.checkpointing == "off":
        saved = s.num_layers * whole_layer + final_norm
    elif w.checkpointing == "on":
        saved = (s.num_layers - kept) * c * s.hidden_size * n + kept * whole_layer + final_norm
    else:
        saved = 3 * c * s.hidden_size * n + kept * whole_layer + final_norm
    if w.padded:
        saved += w.micro_batch * w.seq**2
    return saved, final_norm, whole_layer

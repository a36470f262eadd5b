"""GPU sizes and rates, memory-size parsing, and the predicted step time of a workload.

Step time per micro-batch of N tokens (DESIGN.md's floors, each divided by an efficiency):

    FLOPs = 2 P_pass N           P_pass: the layer weights times their passes: 3 with recompute, 2 without;
                                 the fused MLP's recompute leaves out down_proj (kernels/swiglu_mlp.py), so
                                 with the fused kernels its weights make 2 passes in checkpointed layers too
          + 4 V D N          (head: forward + input gradient; the head is frozen)
          + 2 P_lora N (passes + 1)     (LoRA: forward, recompute, input and weight gradients)
          + 2 B T^2 H d_h L (causal attention forward) x (passes - 1 + 2.5)   (flash backward ~2.5x forward)
          full fine-tuning adds 2 P N + 2 V D N for the weight gradients
    t_micro = FLOPs / (rate x efficiency) + dequant bytes / bandwidth + LAYER_OVERHEAD_S x L x passes
              (per-layer fixed costs: launches in an eager step, the small kernels' own time in a CUDA graph)

QLoRA dequantizes every weight once per pass it makes: read 0.5 B/weight and write c bytes, plus the reference
(PyTorch) dequantization's fp32 intermediates: DEQUANT_BYTES_REFERENCE per weight, DEQUANT_BYTES_FUSED for a
Triton kernel. Activation offload moves 2 c D N L bytes per micro-step over PCIe on a side stream, overlapped
with compute: t = max(t_compute, t_copy). The optimizer step (once per grad_accum micro-steps) reads and
writes its states and the fp32 weights (~20 B per trainable element); paged 8-bit AdamW keeps its states on
the GPU unless memory is short (lorafuse.plan.memory), so it is planned without PCIe copies.

`rate` is the card's dense 16-bit tensor rate: the measured bf16 GEMM rate where we have one (H100/H200:
~800 TFLOP/s, not the 989 spec), else the spec sheet's (T4 65 fp16). The efficiency: EFFICIENCY = 0.5 is a stated
prior for the reference path (LoRA steps reach 35-50% of the spec rate in published runs, research/speed-anchors.md
section 7); EFFICIENCY_FUSED = 0.66 is measured: the fused kernels replaying CUDA graphs on an H200 implied 0.63-0.68
over six Llama-2-7B configurations (4 x 512 with 0, 10 and 18 kept layers, with offload and both tables on the host,
with dropout 0.05; 1 x 4096), with the dequantization and the per-layer term counted apart. Cards other than the
H100/H200 are not calibrated. benchmarks/calibration.json names the runs each fitted constant comes from, and
tests/plan/test_measured.py checks the model against them.

train.fp8 runs the forward's and the recompute's base GEMMs in e4m3 (kernels/fp8.py). Those FLOPs, 2 (P_pass - P) N,
take 1 / FP8_SPEEDUP of their bf16 time, and those with K <= 4096 a further 1 / FAST_ACCUM_SPEEDUP (cuBLAS's fast FP8
accumulation there: 2.1% of the 4 x 512 step). FP8_SPEEDUP = 1.4 is measured, not the ~1.8 of the GEMMs alone
(benchmarks/fp8_probe.py): it covers the activations' quantization and the smaller dequantization writes too. It
comes from one pair of runs on one H200 (4 x 512: 0.1613 s bf16 -> 0.1356 s FP8); the other FP8 runs check it. With
an NF4 base the backward's dX = dY W runs in e4m3 too: 2 P N FLOPs a micro-step at 1 / FP8_BACKWARD_SPEEDUP, those
whose reduction (the weight's out_features) is <= 4096 with fast accumulation as well. FP8_BACKWARD_SPEEDUP = 1.35 is
fitted to three A/B pairs, each on one H200 (0.1304 -> 0.1193 s at 4 x 512, 0.281 -> 0.249 s at 1 x 4096, 0.952 ->
0.835 s at 8 x 2048); each pair's ratio lands within 2%. The measured saving grows with the tokens (8.5% -> 12%),
which one constant splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafuse.errors import ConfigError
from lorafuse.options import FP8_FAST_ACCUM_MAX_K
from lorafuse.plan.memory import GIB, trainable_numels
from lorafuse.plan.placement import kept_layers
from lorafuse.plan.workload import Workload, fp8_backward, targeted

EFFICIENCY = 0.5
EFFICIENCY_FUSED = 0.66
LAYER_OVERHEAD_S = 1e-4  # kernel launches per layer per pass in eager mode (~20 kernels x 5 us)
DEQUANT_BYTES_REFERENCE = 12.5  # 0.5 read + fp32 write/read (8) + c-byte write (2) + index/scale traffic
DEQUANT_BYTES_FUSED = 2.5
PCIE_BYTES_S = 20e9  # pinned host <-> GPU, PCIe 4 x16 in practice
FP8_SPEEDUP = 1.4
FAST_ACCUM_SPEEDUP = 1.055  # FP8 GEMMs with K <= lorafuse.options.FP8_FAST_ACCUM_MAX_K (cuBLAS fast accumulation)
FP8_BACKWARD_SPEEDUP = 1.35


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float  # total as torch.cuda.mem_get_info reports it
    tflops: float  # dense 16-bit tensor TFLOP/s we plan with
    bandwidth_gbs: float  # memory bandwidth GB/s
    bf16: bool = True
    fp8: bool = False  # FP8 tensor cores (compute capability 8.9+): train.fp8 runs there


CARDS = [
    Card("T4", 14.7, 65, 320, bf16=False),
    Card("A10G", 22.0, 70, 600),
    Card("L4", 22.0, 121, 300, fp8=True),
    Card("RTX 3090", 23.6, 71, 936),
    Card("RTX 4090", 23.6, 165, 1008, fp8=True),
    Card("A100-40GB", 39.4, 312, 1555),
    Card("L40S", 44.4, 362, 864, fp8=True),
    Card("A100-80GB", 79.2, 312, 2039),
    Card("H100 PCIe", 79.1, 600, 2000, fp8=True),
    Card("H100 SXM", 79.1, 800, 3350, fp8=True),
    Card("H200", 139.8, 800, 4800, fp8=True),
]


def card_by_name(name: str) -> Card | None:
    """Match a device name ("NVIDIA H100 80GB HBM3", "Tesla T4") or a short name ("h100") to a card."""
    n = name.lower().replace("-", " ").replace("nvidia", "").strip()
    if "h200" in n:
        return _card("H200")
    if "h100" in n:
        return _card("H100 PCIe" if "pcie" in n else "H100 SXM")
    if "a100" in n:
        return _card("A100-80GB" if "80" in n else "A100-40GB")
    for key, card in (
        ("a10g", "A10G"),
        ("l40s", "L40S"),
        ("4090", "RTX 4090"),
        ("3090", "RTX 3090"),
        ("t4", "T4"),
        ("l4", "L4"),
    ):
        if re.search(rf"(^|\W){key}(\W|$)", n):
            return _card(card)
    return None


def _card(name: str) -> Card:
    return next(c for c in CARDS if c.name == name)


def card_by_memory(total_bytes: int) -> Card:
    """The listed card whose memory is closest to `total_bytes` (for the speed estimate only)."""
    return min(CARDS, key=lambda c: abs(c.memory_gib * GIB - total_bytes))


_UNITS = {
    "": GIB,
    "k": 1e3,
    "kb": 1e3,
    "m": 2**20,
    "mb": 1e6,
    "g": GIB,
    "gb": 1e9,
    "t": 2**40,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": GIB,
    "tib": 2**40,
}


def parse_memory(text: str) -> tuple[int, Card | None]:
    """ "15GiB" -> bytes. GiB/G binary, GB decimal, a bare number is GiB; a card name gives its memory."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m and m.group(2).lower() in _UNITS:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if value <= 0:
            raise ConfigError(f"--gpu-memory {text!r} must be positive", "e.g. --gpu-memory 15GiB")
        return int(value), None
    card = card_by_name(str(text))
    if card is not None:
        return int(card.memory_gib * GIB), card
    raise ConfigError(
        f"cannot read the GPU memory size {text!r}",
        "write a size such as 15GiB, 16GB or 80G (G/GiB = 2^30 bytes, GB = 10^9), or a card name: "
        + ", ".join(c.name for c in CARDS),
    )


def detect_gpu() -> tuple[str, int, int] | None:
    """(device name, total bytes, free bytes) of CUDA device 0, or None without a GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)
        return torch.cuda.get_device_name(0), int(total), int(free)
    except Exception:  # a broken driver means "no usable GPU" for planning
        return None


def _passes(w: Workload) -> float:
    """Forward passes over the layer weights per micro-step, the backward's input-gradient GEMMs counted as one:
    2 without recompute, 3 with it; layers kept out of the checkpoints skip their recompute."""
    if w.checkpointing == "off":
        return 2
    return 3 - kept_layers(w) / w.shape.num_layers


def weight_passes(w: Workload) -> float:
    """Sum over the layer weights of the passes each makes per micro-step (module docstring): P x passes, less
    down_proj's recompute in the checkpointed layers when the fused MLP runs."""
    s = w.shape
    total = s.linear_params * _passes(w)
    if w.kernels == "fused" and w.checkpointing != "off":
        down = next(lin for lin in s.linears() if lin.name == "down_proj")
        total -= down.numel * (s.num_layers - kept_layers(w))
    return total


def step_flops(w: Workload) -> float:
    """Matmul + attention FLOPs of one micro-step (module docstring)."""
    s, n = w.shape, w.tokens
    passes = _passes(w)
    head = 2 * s.vocab_size * s.hidden_size * n
    flops = 2 * weight_passes(w) * n + 2 * head
    if w.method == "full":
        flops += 2 * s.linear_params * n + head
    else:
        lora_params = s.num_layers * sum(w.r * (lin.in_features + lin.out_features) for lin in targeted(w))
        flops += 2 * lora_params * n * (passes + 1)
    attn_fwd = 2 * w.micro_batch * w.seq**2 * s.num_heads * s.head_dim * s.num_layers
    return flops + attn_fwd * (passes - 1 + 2.5)


def fp8_flops(w: Workload) -> tuple[float, float, float, float]:
    """(forward, forward_fast, backward, backward_fast): the FLOPs of one micro-step that train.fp8 runs in e4m3 (the
    base GEMMs of the forward and the recompute; with an NF4 base, the backward's dX too), and those of each whose
    reduction is at most FP8_FAST_ACCUM_MAX_K, which use cuBLAS's fast accumulation."""
    if not w.fp8 or w.kernels != "fused" or w.method == "full" or w.compute_bytes != 2:
        return 0.0, 0.0, 0.0, 0.0  # (on a card without FP8 the run stops at start-up: the plan says so, fit.plan)
    s = w.shape
    recompute = 0.0 if w.checkpointing == "off" else 1 - kept_layers(w) / s.num_layers
    max_k = FP8_FAST_ACCUM_MAX_K
    backward = fp8_backward(w)
    fwd = fwd_fast = bwd = bwd_fast = 0.0
    for lin in s.linears():
        passes = 1 + (0.0 if lin.name == "down_proj" else recompute)  # the fused recompute skips down_proj
        flops = 2 * lin.numel * s.num_layers * passes * w.tokens
        fwd += flops
        fwd_fast += flops if lin.in_features <= max_k else 0.0
        if backward:
            flops = 2 * lin.numel * s.num_layers * w.tokens
            bwd += flops
            bwd_fast += flops if lin.out_features <= max_k else 0.0
    return fwd, fwd_fast, bwd, bwd_fast


def _fp8_saved_flops(w: Workload) -> float:
    """The bf16-equivalent FLOPs that train.fp8 takes off the step (module docstring)."""
    fwd, fwd_fast, bwd, bwd_fast = fp8_flops(w)
    accum = 1 - 1 / FAST_ACCUM_SPEEDUP
    return (
        fwd * (1 - 1 / FP8_SPEEDUP)
        + fwd_fast / FP8_SPEEDUP * accum
        + bwd * (1 - 1 / FP8_BACKWARD_SPEEDUP)
        + bwd_fast / FP8_BACKWARD_SPEEDUP * accum
    )


def efficiency(w: Workload) -> float:
    """The fraction of the card's rate the step's FLOPs run at (module docstring)."""
    return EFFICIENCY_FUSED if w.kernels == "fused" else EFFICIENCY


def micro_step_seconds(w: Workload, card: Card) -> float:
    s = w.shape
    passes = _passes(w)
    rate = card.tflops * 1e12 * efficiency(w)
    compute = (step_flops(w) - _fp8_saved_flops(w)) / rate
    if w.method == "qlora":
        per_weight = DEQUANT_BYTES_FUSED if w.kernels == "fused" else DEQUANT_BYTES_REFERENCE
        compute += per_weight * weight_passes(w) / (card.bandwidth_gbs * 1e9)
    compute += LAYER_OVERHEAD_S * s.num_layers * passes
    if w.checkpointing == "offload":
        copy = 2 * w.compute_bytes * s.hidden_size * w.tokens * s.num_layers / PCIE_BYTES_S
        compute = max(compute, copy)
    return compute


def optimizer_step_seconds(w: Workload, card: Card) -> float:
    numels = trainable_numels(w)
    return 20 * sum(numels) / (card.bandwidth_gbs * 1e9)


def step_seconds(w: Workload, card: Card) -> float:
    """Predicted seconds per optimizer step (grad_accum micro-steps + the optimizer)."""
    return w.grad_accum * micro_step_seconds(w, card) + optimizer_step_seconds(w, card)


def tokens_per_second(w: Workload, card: Card) -> float:
    return w.grad_accum * w.tokens / step_seconds(w, card)

"""The resolved switches of a run: what the config asks for, frozen, handed to every layer that acts on it.

`RunConfig.options()` (config.py) builds an `Options` once per run; the job passes it to the runtime that prepares
the model (accel/), the training loop and the planner alike, and the fused kernels receive its `kernel` part with
each projection's operands (`kernels.reference.LoRAWeights.opts`). No module reads a behaviour switch from the
environment, and none writes another module's globals: a reader finds what a run does here and in the config.

This module imports nothing from lorafuse and nothing heavy (no torch), so the planner, the kernels and the
config can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# cuBLAS's fast FP8 accumulation (`use_fast_accum`) for GEMMs whose reduction K is at most this. Measured with
# benchmarks/fp8_probe.py on an H200: 8-11% faster at K = 4096, 6% slower at K = 11008, the same error on random
# data; on the 7B QLoRA step at 4 x 512 it took 2.1% off (benchmarks/NOTES.md). The planner prices it from here.
FP8_FAST_ACCUM_MAX_K = 4096


@dataclass(frozen=True)
class KernelOptions:
    """What the fused LoRA kernels do with one projection (kernels/lora_linear.py, fp8.py).

    fp8: the frozen base weight's GEMMs in e4m3 (forward, checkpoint recompute, and the backward's dX of NF4
        weights); the LoRA products and gradients stay in the compute dtype (train.fp8).
    fp8_fast_accum_max_k: FP8 GEMMs with K at most this use cuBLAS's fast accumulation.
    dequant_cap_bytes: an NF4 weight whose 16-bit copy exceeds this is dequantized and multiplied in row parts
        (train.dequant_cap_mib; 0: whole weights).
    fused_ds_db: dS and dB from one read of dY in one Triton kernel instead of two cuBLAS GEMMs
        (experimental.fused_ds_db, an unmeasured A/B switch).
    """

    fp8: bool = False
    fp8_fast_accum_max_k: int = FP8_FAST_ACCUM_MAX_K
    dequant_cap_bytes: int = 0
    fused_ds_db: bool = False


@dataclass(frozen=True)
class Options:
    """Every behaviour switch of a run that acts below the config (see the module docstring).

    fast_path: "auto" | "on" | "off" (train.fast_path). cuda_graphs: "auto" | "off" (train.cuda_graphs).
    gradient_checkpointing: True | False | "offload". uncheckpointed_layers: the last N layers keep their activations.
    embeddings_on_host / head_on_host: the frozen input table / output head in pinned host memory.
    kernel: the fused kernels' part.
    """

    fast_path: str = "auto"
    cuda_graphs: str = "auto"
    gradient_checkpointing: bool | str = True
    uncheckpointed_layers: int = 0
    embeddings_on_host: bool = False
    head_on_host: bool = False
    kernel: KernelOptions = field(default_factory=KernelOptions)

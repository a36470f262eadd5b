"""The decisions the planner predicts and the runtime makes, in one place (torch-free).

Each function here is called by both sides: `lorafuse plan` and train.auto_fit price a setting with it before a model
exists, and lorafuse.accel decides with it on the loaded model, so the prediction and the run cannot disagree.

    fast_path_blocker_for(...)  whether the fused kernels apply, from what a config says
    arch_blocker(...)           whether they cover a model class
    fp8_blocker(...)            whether train.fp8 can run: the card, the compute dtype, the fused kernels
    fp8_backward(...)           whether the backward's dX runs in FP8 too (NF4 bases)
    head_streams(...)           whether a head kept in host memory streams through the loss in chunks
"""

from __future__ import annotations

# The model classes the fused kernels cover (accel/fast_path.py swaps their modules).
FAST_PATH_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
FP8_MIN_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: FP8 tensor cores
# A head kept in host memory streams through the loss in vocabulary chunks of about this many bytes, this many in
# flight (accel/host_tables.HeadStage); the planner counts them at the peak.
HEAD_CHUNK_BYTES, HEAD_AHEAD = 32 << 20, 3


def fast_path_blocker_for(mode: str, dora: bool, arch: str | None = None) -> str:
    """Why the fused kernels would not run for a config ("" when they would, on an NVIDIA GPU with Triton).
    `arch`: the model class when known (the planner reads it from config.json)."""
    if mode == "off":
        return "train.fast_path is off"
    if dora:
        return "DoRA, which the fused kernels do not implement"
    return "" if arch is None else arch_blocker(arch)


def arch_blocker(arch: str) -> str:
    """Why the fused kernels do not cover the model class `arch` ("" when they do)."""
    if arch not in FAST_PATH_ARCHS:
        return f"{arch} is not a supported architecture (fast path: {', '.join(FAST_PATH_ARCHS)})"
    return ""


def fp8_blocker(capability: tuple[int, int] | None, card: str, bf16: bool, fused: bool, fused_why: str = "") -> str:
    """Why train.fp8 cannot run ("" when it can). `capability`: the card's compute capability (None: no CUDA GPU);
    `bf16`: the compute dtype is bfloat16; `fused`: the fused kernels are in place (FP8 runs inside them)."""
    if capability is None:
        return "FP8 GEMMs need an NVIDIA GPU"
    if tuple(capability) < FP8_MIN_CAPABILITY:
        major, minor = capability
        return f"FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper, Blackwell); {card} is {major}.{minor}"
    if not bf16:
        return "FP8 GEMMs need bf16 compute"
    if not fused:
        return f"FP8 runs inside the fused kernels only, and they do not apply ({fused_why or 'fast path off'})"
    return ""


def fp8_backward(fp8: bool, nf4: bool) -> bool:
    """With train.fp8 the backward's dX of an NF4 weight runs in FP8 too: measured -8.5% to -12% of a 7B step on an
    H200, the loss curve within the bf16 noise (benchmarks/NOTES.md). A 16-bit weight's dX stays bf16."""
    return fp8 and nf4


def head_streams(tokens: int, hidden: int, head_bytes: int) -> bool:
    """A head in host memory streams through the loss in chunks when the loss's fp32 (tokens, hidden) state is
    smaller than the whole head (4 x 512 tokens at a 7B: 32 MiB against 0.24 GiB), else it is staged whole."""
    return 4 * hidden * tokens < head_bytes

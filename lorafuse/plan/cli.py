"""`lorafuse plan CONFIG [--gpu-memory 15GiB] [--json]`: print the memory plan of a training config.

Exit status: 0 when the run fits (or no GPU size is known), 1 when it does not fit as configured (the
suggestion then says what does).
"""

from __future__ import annotations

import json
import shlex
import sys

from lorafuse.plan.fit import Plan, plan
from lorafuse.plan.memory import GIB
from lorafuse.plan.placement import host_embedding, streamed_head
from lorafuse.plan.speed import efficiency
from lorafuse.plan.workload import fp8_backward

_LABELS = {
    "weights_nf4": "NF4 weights + quantization constants",
    "weights_16bit": "{dtype} weights ({embeddings}{linears})",
    "lora_params": "LoRA parameters (fp32{copy})",
    "gradients": "gradients ({what})",
    "optimizer_states": "optimizer states ({opt})",
    "activations": "saved activations (checkpointing {ck})",
    "recompute": "one layer recomputed in backward",
    "backward_workspace": "backward buffers (+ NF4 dequant)",
    "forward_workspace": "one layer's forward buffers (+ NF4 dequant)",
    "logits_loss": "logits / loss workspace ({loss})",
    "head_staged": "output head{chunks}, staged from host memory",
    "cublas_workspace": "cuBLAS workspaces",
    "allocator_slack": "caching-allocator slack (estimate)",
    "cuda_context": "CUDA context (estimate)",
}


_PHASES = {"forward": "forward of a late layer, with the head staged"}


def _fmt_n(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def render(p: Plan, train_command: str = "lorafuse train CONFIG") -> str:
    """The plan as text; the suggestion's command is `train_command` followed by the overrides that apply it."""
    w, e, s = p.workload, p.estimate, p.shape
    lines = [
        f"plan for {p.model}: shape {s.name} ({_fmt_n(s.total_params)} params, {s.num_layers} layers, "
        f"hidden {s.hidden_size}, vocab {s.vocab_size})",
        f"  {w.method} r={w.r} on {', '.join(w.targets)}: {e.trainable:,} trainable params; micro-batch "
        f"{w.micro_batch} x {w.seq} tokens, grad_accum {w.grad_accum}; {w.optimizer}; "
        f"{'fp32' if w.compute_bytes == 4 else '16-bit'} compute; {w.kernels} kernels"
        f"{'; FP8 GEMMs' if w.fp8 and w.kernels == 'fused' else ''}"
        f"{' (backward dX too)' if fp8_backward(w) else ''}",
        "",
    ]
    copy = w.autocast and w.lora_bytes > w.compute_bytes and w.kernels != "fused"  # memory.estimate's rule
    fill = {
        "copy": " + autocast 16-bit copy" if copy else "",
        "dtype": "fp32" if w.compute_bytes == 4 else "16-bit",
        "linears": "" if w.method == "qlora" else ", linears",
        "embeddings": "head, norms; embedding on host" if host_embedding(w) else "embeddings, head, norms",
        "what": ("all weights" if w.method == "full" else "LoRA only, fp32")
        + ("; so far this step" if w.grad_accum == 1 and not w.cuda_graphs and e.phase != "optimizer step" else ""),
        "opt": w.optimizer,
        "ck": w.checkpointing,
        "loss": "head streamed in chunks"
        if streamed_head(w)
        else {"full": "full logits", "chunked": "chunked", "fused": "fused kernel"}[w.loss],
        "chunks": ": the chunks in flight" if streamed_head(w) else "",
    }
    for key, value in e.components.items():
        if value:
            lines.append(f"  {_LABELS.get(key, key).format(**fill):<52} {value / GIB:8.2f} GiB")
    lines.append(
        f"  {'peak allocated (torch max_memory_allocated)':<52} {e.peak_alloc / GIB:8.2f} GiB"
        f"   (at the {_PHASES.get(e.phase, e.phase)})"
    )
    verdict = "" if p.fits is None else (" -> fits" if p.fits else " -> does NOT fit")
    budget = "" if p.budget is None else f" of {p.budget / GIB:.2f} GiB ({p.budget_source})"
    lines.append(f"  {'predicted GPU total':<52} {e.peak / GIB:8.2f} GiB{budget}{verdict}")
    if p.card is not None and p.step_s is not None:
        lines.append(
            f"\n  predicted {p.step_s:.2f} s per optimizer step, {p.tokens_per_s:,.0f} tokens/s on "
            f"{p.card.name} ({p.card.tflops:.0f} TFLOP/s x efficiency {efficiency(w):.2f}; "
            f"card {p.card_source})"
        )
    if p.suggestion is not None:
        lines.append(_render_suggestion(p, train_command))
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def _render_suggestion(p: Plan, train_command: str) -> str:
    sg = p.suggestion
    if not sg["overrides"]:
        return "  this setting is already the fastest that fits"
    speedup = "" if not p.tokens_per_s else f" ({sg['tokens_per_s'] / p.tokens_per_s:.2f}x)"
    args = " ".join(
        shlex.quote(f"{k}={str(v).lower() if isinstance(v, bool) else v}") for k, v in sg["overrides"].items()
    )
    return (
        f"\n  fastest setting that fits: micro_batch_size {sg['micro_batch_size']}, grad_accum "
        f"{sg['grad_accum']}, gradient checkpointing {sg['gradient_checkpointing']}, max_length "
        f"{sg['max_length']}{', embedding in host memory' if sg.get('embeddings_on_host') else ''}"
        f"{', head in host memory' if sg.get('head_on_host') else ''}"
        f"{f', last {k} layers keep activations' if (k := sg.get('uncheckpointed_layers')) else ''}"
        f"{f', NF4 weights dequantized in parts of <= {c} MiB' if (c := sg.get('dequant_cap_mib')) else ''} -> "
        f"{sg['peak_gib']:.2f} GiB, {sg['tokens_per_s']:,.0f} tokens/s{speedup}\n"
        f"    {train_command} {args}"
    )


def plan_command(
    cfg, gpu_memory=None, as_json: bool = False, gpu: str | None = None, file=None, train_command: str | None = None
) -> int:
    """Print the plan (text or JSON). Returns 1 when the run does not fit as configured, else 0.
    train_command: the `lorafuse train ...` command of this config (its file and overrides), which the suggestion
    extends; default "lorafuse train CONFIG"."""
    p = plan(cfg, gpu_memory=gpu_memory, gpu=gpu)
    out = file or sys.stdout
    text = render(p, train_command) if train_command else render(p)
    print(json.dumps(p.to_dict(), indent=2) if as_json else text, file=out)
    return 1 if p.fits is False else 0

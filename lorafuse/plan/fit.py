"""From a RunConfig to a plan: the predicted peak, whether it fits, and the fastest setting that fits.

The search keeps the effective batch (micro_batch_size x grad_accum) and the data, and varies only what does
not change the optimisation: micro_batch_size over the divisors of the effective batch (grad_accum follows),
gradient checkpointing off / on, and with it on, the last quarter, half or three quarters of the layers keeping
their activations (`train.uncheckpointed_layers`: memory to spare spent on skipping their recompute). The
fastest candidate by predicted tokens/s among those whose predicted GPU total fits wins (a config that already
fits is changed only for a predicted gain of 2% or more); ties go to the smaller peak. When none fits, the same
settings with the input embedding in pinned host memory are tried (`train.embeddings_on_host`, not for a tied
embedding), then with the output head there too between losses (`train.head_on_host`), then activation offload
(layer inputs in pinned CPU memory) with them, then (QLoRA on the fused kernels) the largest NF4 weights
dequantized in halves (`train.dequant_cap_mib`): all cost host memory, PCIe traffic or a little time the speed
model prices only roughly, so they never displace a setting before them. Only when nothing fits is max_length
halved (down to 64), since that changes what the model sees.

`suggest(cfg, gpu_memory)` returns that setting as config overrides ({"train.micro_batch_size": 2, ...},
keys as `lorafuse train ... key=value` takes them); `next_smaller(cfg)` is the training loop's hook after a
CUDA OOM (lorafuse.training.oom): the predicted-fastest setting one step smaller (kept layers recomputed again,
checkpointing on, or the largest proper divisor of the micro-batch, grad_accum raised to keep the effective
batch; a divisor, so the loop can re-split the failed step's micro-batches exactly), then a halved max_length,
then None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafuse.errors import LorafuseError
from lorafuse.plan import speed
from lorafuse.plan.memory import GIB, Estimate, estimate
from lorafuse.plan.placement import host_embedding, host_head, kept_layers
from lorafuse.plan.shapes import ModelShape
from lorafuse.plan.workload import Workload, fp8_backward, workload_from_config

MIN_MAX_LENGTH = 64
MAX_MICRO_BATCH = 64
MIN_GAIN = 1.02  # a fitting config is only changed for a predicted speed-up of at least 2%


@dataclass
class Plan:
    model: str
    shape: ModelShape
    workload: Workload
    estimate: Estimate
    budget: int | None = None  # GPU bytes planned for
    budget_source: str = "none"
    card: speed.Card | None = None
    card_source: str = ""
    step_s: float | None = None
    tokens_per_s: float | None = None
    suggestion: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.estimate.peak <= self.budget

    def to_dict(self) -> dict:
        w = self.workload
        return {
            "peak_gib": _gib(self.estimate.peak),
            "peak_alloc_gib": _gib(self.estimate.peak_alloc),
            "fits": self.fits,
            "gpu_memory_gib": None if self.budget is None else _gib(self.budget),
            "components": {k: _gib(v) for k, v in self.estimate.components.items()},
            "suggestion": self.suggestion,
            "model": self.model,
            "shape": self.shape.name,
            "params": self.shape.total_params,
            "trainable_params": self.estimate.trainable,
            "peak_phase": self.estimate.phase,
            "setting": {
                "method": w.method,
                "micro_batch_size": w.micro_batch,
                "grad_accum": w.grad_accum,
                "max_length": w.seq,
                "gradient_checkpointing": w.checkpointing,
                "optimizer": w.optimizer,
                "loss": w.loss,
                "kernels": w.kernels,
                "r": w.r,
                "targets": list(w.targets),
            },
            "card": None if self.card is None else self.card.name,
            "step_s": _r(self.step_s),
            "tokens_per_s": _r(self.tokens_per_s),
            "notes": self.notes,
        }


def _gib(n: int) -> float:
    return round(n / GIB, 3)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _budget(gpu_memory) -> tuple[int | None, str, speed.Card | None, str]:
    """(bytes, where that number came from, card for the speed estimate, where the card came from)."""
    if gpu_memory is not None:
        if isinstance(gpu_memory, (int, float)):
            total, card = int(gpu_memory), None
        else:
            total, card = speed.parse_memory(gpu_memory)
        if card is not None:
            label = card.name if str(gpu_memory).lower() == card.name.lower() else f"{card.name} ({gpu_memory})"
            return total, label, card, "named"
        return total, f"--gpu-memory {gpu_memory}", speed.card_by_memory(total), "assumed from the memory size"
    found = speed.detect_gpu()
    if found is None:
        return None, "none", None, ""
    name, total, free = found
    # This process's own context is part of "used"; the training run will have one context, counted in peak.
    budget = min(total, free + int(0.5 * GIB))
    card = speed.card_by_name(name)
    source = "detected" if card else "assumed from the memory size of " + name
    return (
        budget,
        f"detected {name} ({free / GIB:.1f} of {total / GIB:.1f} GiB free)",
        card or speed.card_by_memory(total),
        source,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, MAX_MICRO_BATCH) + 1) if n % d == 0]


def _candidates(w: Workload, policies=("off", "on")):
    """Micro-batch splits x checkpointing policies; with checkpointing on, also the last quarter, half or three
    quarters of the layers keeping their activations (train.uncheckpointed_layers): memory spent on speed."""
    effective = w.micro_batch * w.grad_accum
    layers = w.shape.num_layers
    for mb in _divisors(effective):
        for checkpointing in policies:
            kept = (0, layers // 4, layers // 2, 3 * layers // 4) if checkpointing == "on" else (0,)
            for k in sorted(set(kept)):
                yield w.with_(micro_batch=mb, grad_accum=effective // mb, checkpointing=checkpointing, uncheckpointed=k)


def fastest_fitting(w: Workload, budget: int, card: speed.Card) -> Workload | None:
    """The fastest candidate whose predicted GPU total fits `budget`, trying in order: on-GPU settings; the same
    with the input embedding in host memory (when untied); the output head there too; activation offload (with
    them); the largest NF4 weights dequantized in halves; and only then max_length halved."""
    hosted = w.with_(embeddings_on_host=True)
    tiers = [(w, ("off", "on"))]
    if not w.embeddings_on_host and host_embedding(hosted):
        tiers.append((hosted, ("off", "on")))
    both = tiers[-1][0].with_(head_on_host=True)
    if not w.head_on_host and host_head(both):
        tiers.append((both, ("off", "on")))
    tiers.append((tiers[-1][0], ("offload",)))
    if w.method == "qlora" and w.kernels == "fused" and not w.dequant_cap_mib:  # then the largest weights in halves
        largest = max(lin.numel for lin in w.shape.linears()) * w.compute_bytes
        tiers.append((tiers[-1][0].with_(dequant_cap_mib=-(-largest // 2 // (1 << 20))), tiers[-1][1]))
    seq = w.seq
    while seq >= MIN_MAX_LENGTH:
        for base, policies in tiers:
            scored = []
            for cand in _candidates(base.with_(seq=seq), policies):
                est = estimate(cand)
                if est.peak <= budget:
                    scored.append((-speed.tokens_per_second(cand, card), est.peak, cand))
            if scored:
                return min(scored, key=lambda t: (t[0], t[1]))[2]
        seq //= 2
    return None


def _overrides(cur: Workload, new: Workload) -> dict:
    out = {}
    if new.micro_batch != cur.micro_batch:
        out["train.micro_batch_size"] = new.micro_batch
    if new.grad_accum != cur.grad_accum:
        out["train.grad_accum"] = new.grad_accum
    if new.checkpointing != cur.checkpointing:
        out["train.gradient_checkpointing"] = {"on": True, "off": False}.get(new.checkpointing, new.checkpointing)
    if new.seq != cur.seq:
        out["data.max_length"] = new.seq
    if new.embeddings_on_host != cur.embeddings_on_host:
        out["train.embeddings_on_host"] = new.embeddings_on_host
    if new.head_on_host != cur.head_on_host:
        out["train.head_on_host"] = new.head_on_host
    if kept_layers(new) != kept_layers(cur):
        out["train.uncheckpointed_layers"] = kept_layers(new)
    if new.dequant_cap_mib != cur.dequant_cap_mib:
        out["train.dequant_cap_mib"] = new.dequant_cap_mib
    return out


def describe(w: Workload, card: speed.Card, cur: Workload | None = None) -> dict:
    est = estimate(w)
    d = {
        "micro_batch_size": w.micro_batch,
        "grad_accum": w.grad_accum,
        "gradient_checkpointing": w.checkpointing,
        "max_length": w.seq,
        "embeddings_on_host": host_embedding(w),
        "head_on_host": host_head(w),
        "uncheckpointed_layers": kept_layers(w),
        "dequant_cap_mib": w.dequant_cap_mib,
        "peak_gib": _gib(est.peak),
        "step_s": round(speed.step_seconds(w, card), 4),
        "tokens_per_s": round(speed.tokens_per_second(w, card), 1),
    }
    if cur is not None:
        d["overrides"] = _overrides(cur, w)
    return d


def plan(cfg, gpu_memory=None, gpu: str | None = None) -> Plan:
    """Predict the memory of `cfg`'s training step on a GPU of `gpu_memory` ("15GiB", bytes, or a card name;
    None: the visible GPU) and search the fastest setting that fits. `gpu` names the card for the speed
    estimate when the memory size alone would be ambiguous (and gives the memory when no size is given)."""
    w = workload_from_config(cfg)
    if gpu_memory is None and gpu and speed.card_by_name(gpu) is not None:
        gpu_memory = gpu  # a named card, no size: plan for that card's memory
    budget, budget_source, card, card_source = _budget(gpu_memory)
    if gpu:
        card, card_source = speed.card_by_name(gpu) or card, "named"
    p = Plan(
        model=str(cfg.model.path),
        shape=w.shape,
        workload=w,
        estimate=estimate(w),
        budget=budget,
        budget_source=budget_source,
        card=card,
        card_source=card_source,
    )
    if card is not None:
        _card_notes(p, w, card, str(cfg.model.compute_dtype))
    if budget is None:
        p.notes.append(
            "no GPU visible and no --gpu-memory given: pass --gpu-memory 15GiB (or a card name) "
            "to check the fit and get a suggestion"
        )
        return p
    best = fastest_fitting(w, budget, card)
    if best is not None and p.fits and speed.tokens_per_second(best, card) < MIN_GAIN * p.tokens_per_s:
        best = w  # not worth a change: within the model's noise
    if best is not None:
        p.suggestion = describe(best, card, cur=w)
    else:
        p.notes.append(
            f"nothing fits in {budget / GIB:.1f} GiB, even micro-batch 1 with max_length "
            f"{MIN_MAX_LENGTH}: use a smaller model, quant nf4, or a larger GPU"
        )
    if best is not None:
        _placement_notes(p, best, w)
    return p


def _card_notes(p: Plan, w: Workload, card, compute_dtype: str) -> None:
    """The step time on `card`, and what the card says about the dtype and train.fp8."""
    p.step_s, p.tokens_per_s = speed.step_seconds(w, card), speed.tokens_per_second(w, card)
    if not card.bf16 and compute_dtype == "bfloat16":
        p.notes.append(
            f"the {card.name} has no bfloat16 arithmetic: set model.compute_dtype: float16 (or auto), "
            "which trains with a GradScaler at the same memory"
        )
    if w.fp8 and w.kernels != "fused":
        p.notes.append(
            "train.fp8 runs inside the fused kernels, which this run would not use (train.fast_path "
            "off, or DoRA), so it would stop at start-up: set train.fp8: false or train.fast_path: auto"
        )
    elif w.fp8 and not card.fp8:
        p.notes.append(
            f"train.fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); the {card.name} "
            "has none, so the run would stop at start-up: set train.fp8: false"
        )
    elif card.fp8 and not w.fp8 and w.kernels == "fused" and w.method != "full" and w.compute_bytes == 2:
        on = w.with_(fp8=True)
        faster, more = speed.step_seconds(on, card), estimate(on).peak - p.estimate.peak
        memory = f"+{more / GIB:.2f} GiB at the peak" if more >= 0.005 * GIB else "same memory"
        p.notes.append(
            f"opt-in: train.fp8: true runs the base GEMMs in FP8 on the {card.name} (forward, "
            f"recompute{', the backward dX' if fp8_backward(on) else ''}): ~{faster:.2f} s per step "
            f"instead of {p.step_s:.2f} s, {memory}; the numbers change (~3.7% error per projection "
            "output), so compare the loss curve"
        )


def _placement_notes(p: Plan, best: Workload, w: Workload) -> None:
    """What the suggested setting moves out of GPU memory that the config did not, and its cost."""
    if best.embeddings_on_host and not w.embeddings_on_host:
        p.notes.append(
            "the input embedding moves to pinned host memory (train.embeddings_on_host), read in place "
            "by the GPU: measured at no step-time cost on an H200"
        )
    if best.head_on_host and not w.head_on_host:
        p.notes.append(
            "the output head waits in pinned host memory between losses (train.head_on_host): one PCIe "
            "copy of it per forward, overlapped with the forward"
        )
    if best.dequant_cap_mib and not w.dequant_cap_mib:
        p.notes.append(
            f"the largest NF4 weights are dequantized in halves (train.dequant_cap_mib: "
            f"{best.dequant_cap_mib}): about 1% of step time measured on an H200"
        )
    if best.checkpointing == "offload" and w.checkpointing != "offload":
        p.notes.append(
            "only activation offload fits at this max_length: the layer inputs wait in pinned CPU "
            "memory (host RAM, PCIe traffic each step)"
        )


def suggest(cfg, gpu_memory=None) -> dict:
    """Config overrides for the fastest setting that fits (empty: the config already is it)."""
    p = plan(cfg, gpu_memory)
    if p.budget is None:
        raise LorafuseError("no GPU is visible to size the run for", "pass gpu_memory, e.g. '15GiB'")
    if p.suggestion is None:
        raise LorafuseError(
            f"{p.model} does not fit in {p.budget / GIB:.1f} GiB in any setting the planner tries",
            "use quant nf4, a smaller model, or a GPU with more memory",
        )
    return p.suggestion["overrides"]


def next_smaller(cfg) -> dict | None:
    """Overrides for the next smaller setting after an out-of-memory error, or None at the floor."""
    w = workload_from_config(cfg)
    card = speed.card_by_name("H100")  # only the ranking matters, and it barely depends on the card
    effective = w.micro_batch * w.grad_accum
    steps = []
    if kept_layers(w):  # the cheapest step back: recompute every layer again
        steps.append(w.with_(uncheckpointed=0))
    if w.checkpointing == "off":
        steps.append(w.with_(checkpointing="on"))
    smaller = [d for d in _divisors(w.micro_batch) if d < w.micro_batch]  # divides mb, hence the effective batch
    if smaller:
        steps.append(w.with_(micro_batch=smaller[-1], grad_accum=effective // smaller[-1]))
    cur_peak = estimate(w).peak_alloc
    steps = [s for s in steps if estimate(s).peak_alloc < cur_peak]
    if steps:
        return _overrides(w, max(steps, key=lambda s: speed.tokens_per_second(s, card)))
    if w.seq // 2 >= MIN_MAX_LENGTH:
        return {"data.max_length": w.seq // 2}
    return None


def apply_overrides(cfg, overrides: dict):
    """A copy of a RunConfig with dotted-key overrides applied ({"train.grad_accum": 8})."""
    sections: dict = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    return cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=u) for s, u in sections.items()})

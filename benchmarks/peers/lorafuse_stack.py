"""lorafuse runner: QLoRA (NF4 base) or LoRA (16-bit base) through lorafuse's public API and its training step.

load_model(folder, quant) -> apply_lora(r, alpha, dropout, the 7 projections) -> accel.prepare with the run's
Options (the fast path on CUDA, non-reentrant checkpointing, fp32 LoRA masters, offload, host tables, FP8) -> the
training loop's pieces: Precision (autocast), lm_loss_sum (chunked or fused loss from hidden states),
build_optimizer; clip at 1.0 and step, as lorafuse.training.loop does each step.
The step is written here from those public functions (TrainingLoop.step needs the loop's batchers and run folder).

objective dpo: the same model and optimizer; the loss is the DPO objective's (lorafuse.training.objectives.dpo,
sigmoid loss, beta 0.1) with the live reference (this model with the adapter switched off, no copy), checked at
start as a fresh run checks it, and each pair's prompt run once (train.shared_prompt auto; --shared-prompt off: a
row per answer); backward of loss_sum / pairs, clip, step. Its micro-step (both passes, the pair loss)
is replayed as a CUDA graph where the SFT step's would be (--no-graphs: eager), as the training loop does.
"""

from __future__ import annotations

from bench_common import DPO_BETA, PROJ7, require, run, unavailable


def _options(spec: dict):
    """The Options a `lorafuse train` run with these settings would resolve (RunConfig.options)."""
    from lorafuse.config import ExperimentalConfig, kernel_options
    from lorafuse.options import Options

    experimental = ExperimentalConfig(**{key: True for key in spec.get("experimental") or ()})  # --experimental
    kernel = kernel_options(bool(spec.get("fp8")), spec.get("dequant_cap_mib") or 0, experimental)
    return Options(
        fast_path=spec.get("fast_path", "auto"),
        cuda_graphs="auto" if spec.get("cuda_graphs", True) else "off",
        gradient_checkpointing=spec["gc"],
        uncheckpointed_layers=spec.get("uncheckpointed_layers") or 0,
        embeddings_on_host=bool(spec.get("embeddings_on_host")),
        head_on_host=bool(spec.get("head_on_host")),
        kernel=kernel,
    )


def build(spec: dict, device):
    if spec["method"] not in ("qlora", "lora"):
        unavailable(f"lorafuse trains adapters (qlora, lora), not {spec['method']}")
    for module in (
        "lorafuse.accel",
        "lorafuse.model.load",
        "lorafuse.model.inject",
        "lorafuse.training.loop",
        "lorafuse.training.loss",
        "lorafuse.training.optim",
    ) + (("lorafuse.training.objectives.dpo",) if spec.get("objective") == "dpo" else ()):
        require(module)
    import torch

    import lorafuse
    from lorafuse import accel
    from lorafuse.training.optim import build_optimizer
    from lorafuse.training.runtime import Precision

    dtype = getattr(torch, spec["dtype"])
    model = _load(spec, device, dtype)
    lorafuse.apply_lora(model, r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"], targets=PROJ7)
    notes = []
    state = accel.prepare(model, _options(spec), note=notes.append)
    on = state.fast is not None and f"fast path on ({state.fast.ops.name} ops, {state.fast.layers} layers)"
    fast = {"applied": state.fast is not None, "reason": on or next((n for n in notes if "fast path" in n), "")}
    precision = Precision(device, dtype)
    optimizer = build_optimizer(spec["optimizer"], state.params, lr=2e-4, weight_decay=0.0)
    model.train()
    update = _updater(precision, optimizer, state.params)
    make = _dpo_step if spec.get("objective") == "dpo" else _sft_step
    step, info = make(spec, model, state, precision, update, notes)
    step.model = model  # for benchmarks/memory_peak.py's layer hooks
    info.update(
        fast_path=fast,
        fused_loss=state.fused_loss,
        chunked_loss=state.head is not None,
        notes=notes,
        trainable_params=sum(p.numel() for p in state.params),
    )
    return step, info


def _updater(precision, optimizer, params):
    """update(loss, set_to_none): clip at 1.0 and step (fp16: unscale first, skip inf/nan steps), as the loop."""
    import torch

    def update(loss, set_to_none: bool):
        if precision.scaler is not None:  # fp16: unscale before clipping, skip steps with inf/nan gradients
            precision.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)  # a CUDA graph accumulates into the same .grad tensors
        return loss.detach()

    return update


def _sft_step(spec: dict, model, state, precision, update, notes: list):
    """The SFT step: the mean next-token loss over every target, eager or replayed as a CUDA graph."""
    from lorafuse.training.loss import lm_loss_sum

    head, fused = state.head, state.fused_loss
    graphed, graphs = _graphed(
        spec, model, state.params, lambda b: lm_loss_sum(model, b, head, fused), precision, notes
    )

    def step(batch):
        n_target = batch["labels"][:, 1:].numel()
        if graphed is not None:
            loss_sum = graphed(batch, 1.0 / n_target)
            graphs["applied"] = graphed.disabled is None
            return update(loss_sum / n_target, set_to_none=False)
        with precision.autocast():
            loss_sum = lm_loss_sum(model, batch, head, fused)
        precision.backward(loss_sum / n_target)
        return update(loss_sum / n_target, set_to_none=True)

    return step, {"cuda_graphs": graphs}


def _dpo_step(spec: dict, model, state, precision, update, notes: list):
    """The DPO step: the objective's loss over the micro-batch's pairs (reference pass with the adapter off, then
    the policy pass), backward of its mean per pair, clip, step; eager or replayed as a CUDA graph, as the loop."""
    from lorafuse.training.graphs import objective_loss_fn
    from lorafuse.training.objectives.base import ObjectiveContext
    from lorafuse.training.objectives.dpo import DPOObjective, check_live_reference

    shared = spec.get("shared_prompt") or "auto"
    objective = DPOObjective(beta=DPO_BETA, loss="sigmoid", reference="live", shared_prompt=shared)
    check_live_reference(model)  # a fresh adapter: switched off, it is the model DPO starts from
    ctx = ObjectiveContext(precision, head=state.head, fused=state.fused_loss)
    loss_fn = objective_loss_fn(model, objective, precision, state.head, state.fused_loss)
    graphed, graphs = _graphed(spec, model, state.params, loss_fn, precision, notes)

    def prepare(batch):  # the micro-batch as the step's device inputs (the pairs laid out), made before timing
        return objective.inputs(model, batch, precision)

    def step(inputs):
        pairs = spec["pairs"]
        if graphed is not None:
            loss_sum = graphed(inputs, 1.0 / pairs)[0]
            graphs["applied"] = graphed.disabled is None
            return update(loss_sum / pairs, set_to_none=False)
        loss_sum, _ = objective.loss_on_inputs(model, inputs, ctx)  # forwards under the precision's autocast
        precision.backward(loss_sum / pairs)
        return update(loss_sum / pairs, set_to_none=True)

    step.prepare = prepare
    info = {"cuda_graphs": graphs, "beta": DPO_BETA, "loss_type": "sigmoid", "shared_prompt": shared}
    return step, {**info, "reference": "live: this model with the adapter switched off"}


def _load(spec: dict, device, dtype):
    """The base model: generated on the device layer by layer with --random-init (no checkpoint: the 65B-shape
    headline runs), else loaded from the shape's checkpoint folder."""
    import lorafuse

    quant = "nf4" if spec["method"] == "qlora" else "none"
    if spec.get("random_init"):
        from lorafuse.model.random_init import random_nf4_model

        return random_nf4_model(spec["shape"], device, compute_dtype=dtype, seed=spec["seed"], quant=quant)
    return lorafuse.load_model(spec["folder"], quant=quant, compute_dtype=dtype, device=device)[0]


def _graphed(spec: dict, model, params, loss_fn, precision, notes: list):
    """(GraphedMicroStep or None, {"applied", "reason"}): CUDA graphs where the training loop would use them."""
    if not spec.get("cuda_graphs", True):
        return None, {"applied": False, "reason": "disabled (--no-graphs)"}
    try:
        from lorafuse.training.graphs import GraphedMicroStep, graph_blocker
    except ImportError as exc:
        return None, {"applied": False, "reason": f"lorafuse.training.graphs not importable: {exc}"}
    blocker = graph_blocker(model, precision.device)
    if blocker:
        return None, {"applied": False, "reason": blocker}
    graphed = GraphedMicroStep(model, params, loss_fn, precision.backward, precision.dtype, note=notes.append)
    return graphed, {"applied": True, "reason": "forward + backward replayed as a CUDA graph"}


if __name__ == "__main__":
    run(build)

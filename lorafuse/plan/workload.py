"""What the planner's predictions depend on: a Workload (the shape, the method, the batch, the LoRA settings and
the memory policies of one training step), and the Workload a RunConfig describes."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from lorafuse.errors import ConfigError
from lorafuse.plan import policy
from lorafuse.plan.shapes import PROJECTIONS, ModelShape, load_shape


@dataclass(frozen=True)
class Workload:
    """Everything the prediction depends on. `checkpointing`: off | on | offload; `loss`: full | chunked | fused;
    `kernels`: reference | fused; `method`: qlora | lora | full; `cuda_graphs`: the step replays as a CUDA graph
    (its gradients are never freed)."""

    shape: ModelShape
    method: str = "qlora"
    micro_batch: int = 4
    seq: int = 512
    grad_accum: int = 4
    r: int = 16
    targets: tuple = PROJECTIONS
    dropout: float = 0.05
    dora: bool = False
    modules_to_save: tuple = ()
    compute_bytes: int = 2
    lora_bytes: int = 4
    autocast: bool = True
    optimizer: str = "paged_adamw_8bit"
    checkpointing: str = "on"
    loss: str = "chunked"
    kernels: str = "reference"
    padded: bool = True
    blocksize: int = 64
    double_quant: bool = True
    embeddings_on_host: bool = False
    head_on_host: bool = False
    cuda_graphs: bool = False
    uncheckpointed: int = 0  # the last decoder layers keep their activations (train.uncheckpointed_layers)
    dequant_cap_mib: int = 0  # train.dequant_cap_mib (0: whole weights)
    fp8: bool = False  # train.fp8: base GEMMs in e4m3 (the byte buffer is shared; the FP8 backward adds dY's codes)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq

    def with_(self, **kw) -> Workload:
        return replace(self, **kw)


def targeted(w: Workload) -> list:
    """The linears of a decoder layer that carry LoRA (lora.targets, resolved)."""
    return [lin for lin in w.shape.linears() if lin.name in w.targets]


def fp8_backward(w: Workload) -> bool:
    """Does train.fp8 run the backward's dX in e4m3 too (plan/policy.py: NF4 bases, inside the fused kernels)?"""
    return policy.fp8_backward(w.fp8 and w.kernels == "fused" and w.compute_bytes == 2, w.method == "qlora")


def resolve_targets(shape: ModelShape, targets) -> tuple[str, ...]:
    """Which of a layer's linears lora.targets selects (names as lorafuse.model.inject matches them)."""
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return PROJECTIONS
    hit = set()
    for layer in range(shape.num_layers):
        for lin in shape.linears():
            full = shape.module_name(layer, lin.name)
            if isinstance(targets, str):
                ok = re.fullmatch(targets, full) is not None
            else:
                ok = full in targets or any(full.endswith("." + t) for t in targets)
            if ok:
                hit.add(lin.name)
    if not hit:
        raise ConfigError(
            f"lora.targets={targets!r} matches none of the linear layers {list(PROJECTIONS)}",
            'use short names (q_proj, v_proj, ...), a regex on the full name, or "all-linear"',
        )
    return tuple(n for n in PROJECTIONS if n in hit)


def _kernels(fast_path: str, dora: bool) -> str:
    """The kernels a run on an NVIDIA GPU would use (plan/policy.py decides, as the runtime does)."""
    return "reference" if policy.fast_path_blocker_for(fast_path, dora) else "fused"


def workload_from_config(cfg, shape: ModelShape | None = None) -> Workload:
    """The Workload a RunConfig describes (reads cfg.model/lora/data/train attributes only)."""
    shape = shape or load_shape(cfg.model.path)
    save = tuple(m.rsplit(".", 1)[-1] for m in (cfg.lora.modules_to_save or ()))
    kernels = _kernels(cfg.train.fast_path, cfg.lora.dora)
    return Workload(
        shape=shape,
        method="qlora" if cfg.model.quant == "nf4" else "lora",
        micro_batch=cfg.train.micro_batch_size,
        seq=cfg.data.max_length,
        grad_accum=cfg.train.grad_accum,
        r=cfg.lora.r,
        targets=resolve_targets(shape, cfg.lora.targets),
        dropout=cfg.lora.dropout,
        dora=cfg.lora.dora,
        modules_to_save=save,
        compute_bytes=4 if cfg.model.compute_dtype == "float32" else 2,
        optimizer=cfg.train.optimizer,
        checkpointing=_checkpointing(cfg.train.gradient_checkpointing),
        loss="fused" if kernels == "fused" else "chunked",
        kernels=kernels,
        padded=not cfg.data.packing,
        blocksize=cfg.model.blocksize,
        double_quant=cfg.model.double_quant,
        embeddings_on_host=cfg.train.embeddings_on_host,
        head_on_host=cfg.train.head_on_host,
        uncheckpointed=cfg.train.uncheckpointed_layers,
        dequant_cap_mib=cfg.train.dequant_cap_mib,
        fp8=cfg.train.fp8,
        cuda_graphs=kernels == "fused" and cfg.train.cuda_graphs == "auto",
    )


def _checkpointing(value) -> str:
    if isinstance(value, str):
        return value
    return "on" if value else "off"

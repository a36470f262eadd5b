"""The run configuration's `train` section: the optimisation (schedule, batch, optimizer, precision, checkpoints,
evaluation, the objective and lorafuse's speed and memory settings). A `_Section` of lorafuse/config_sections.py:
the same checks (no booleans for numbers, no inf or NaN), one description per field."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lorafuse.config_sections import _Section


class TrainConfig(_Section):
    """The optimisation: schedule, batch, optimizer, checkpoints."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs); null: run all epochs."
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Sequences per forward/backward pass (lower it first on out-of-memory)."
    )
    grad_accum: int = Field(
        4,
        ge=1,
        description="Micro-batches per optimizer step; the effective batch is "
        "micro_batch_size x grad_accum (x GPUs). The loss is normalised by tokens.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter weights.")
    loraplus_lr_ratio: float = Field(
        1.0,
        ge=1,
        description="LoRA+: the adapter's B matrices learn at this many times train.lr, the A matrices and everything "
        "else at train.lr (Hayou et al. 2024 suggest 16 for a fixed lr; lower train.lr with it). 1: one rate for all.",
    )
    modules_to_save_lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of the modules lora.modules_to_save trains whole (the embedding, the output "
        "head), on train.lr's schedule; null: train.lr. Measure it on your task: on the quality benchmark's small "
        "base the tables learnt best at 8-16x the adapter's rate (docs/tokens.md).",
    )
    token_rows_lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of the token rows lorafuse trains (the untrained and new tokens' rows of the "
        "embedding and the head, docs/tokens.md), on train.lr's schedule; null: train.lr.",
    )
    warmup_steps: float = Field(
        0.03, ge=0, description="Linear warmup: a fraction of all steps (< 1) or a step count (>= 1)."
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null: no clipping.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "paged_adamw_8bit",
        description="AdamW with fp32 states, 8-bit states, or 8-bit paged states (no memory spikes; CUDA only).",
    )
    gradient_checkpointing: bool | Literal["offload"] = Field(
        True,
        description="Recompute each layer's activations in backward: much less memory, for a second forward "
        "pass of compute. offload: also keep each layer's input in pinned CPU memory until its backward (long "
        "sequences on small GPUs; costs PCIe traffic and host memory).",
    )
    uncheckpointed_layers: int = Field(
        0,
        ge=0,
        description="With gradient checkpointing, the last N decoder layers save their activations instead "
        "of recomputing them in the backward: each saves about a third of its compute for its saved activations "
        "(~0.2 GiB per layer of a 7B at 2048 tokens a micro-batch). `lorafuse plan` shows the memory.",
    )
    embeddings_on_host: bool = Field(
        False,
        description="Keep the frozen input embedding in pinned CPU memory, read by the GPU in place: frees "
        "vocab x hidden x 2 bytes of GPU memory (0.24 GiB for Llama-2-7B, 0.98 GiB for Llama-3-8B) for a little "
        "PCIe traffic per step. CUDA only; not for an embedding tied to the output head.",
    )
    head_on_host: bool = Field(
        False,
        description="Keep the frozen output head in pinned CPU memory between losses: a device copy is "
        "staged during each forward (a PCIe copy of vocab x hidden x 2 bytes, overlapped with the forward's "
        "second half) and freed after the loss, so the backward, where the step peaks, runs without it (0.24 GiB "
        "for Llama-2-7B, 0.98 GiB for Llama-3-8B). Where that takes less memory (short micro-batches), the copy "
        "streams through the loss in ~32 MiB vocabulary chunks instead. CUDA only; not for a head tied to the input "
        "embedding.",
    )
    dequant_cap_mib: int = Field(
        0,
        ge=0,
        description="QLoRA on the fast path: an NF4 weight whose 16-bit copy exceeds this many MiB is "
        "dequantized and multiplied in row parts, so the one dense weight on the peak shrinks (Llama-2-7B's MLP "
        "weights: 86 MiB -> 43 MiB at 48) for ~1% of step time. 0: whole weights. `lorafuse plan` counts it.",
    )
    fp8: bool = Field(
        False,
        description="Run the frozen base weights' GEMMs in FP8 (e4m3, one scale per token and per weight "
        "row; NF4 weights are decoded straight to 8 bits): the forward's, the checkpoint recompute's and, for NF4 "
        "weights, the backward's input gradient. A 7B QLoRA step ~1.35x "
        "faster on an H200, for ~3.7% relative error per projection output (bf16: ~0.2%). The LoRA products and "
        "gradients and the loss stay bf16; generation after training runs bf16. Needs compute capability 8.9+ (Ada, "
        "Hopper), bf16 compute and the fast path (train.fast_path auto or on, no DoRA); else the run stops at start-up "
        "with the reason. Compare your loss curve with it off (benchmarks/loss_curves.py runs both).",
    )
    save_every: int | None = Field(
        None,
        ge=1,
        description="Checkpoint every N optimizer steps (not at epoch ends then); "
        "null: at the end of each epoch. Always at the end of training and at each new best eval loss.",
    )
    save_total_limit: int = Field(3, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Evaluate every N optimizer steps; null: at the end of each epoch when there is validation data.",
    )
    eval_batch_size: int | None = Field(None, ge=1, description="Sequences per eval batch; null: micro_batch_size.")
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many evaluations without a better validation loss (lower by more than "
        "early_stopping_min_delta); the adapter is then the best checkpoint's. null: never.",
    )
    early_stopping_min_delta: float = Field(
        0.0,
        ge=0,
        description="How much lower than the best so far an eval loss must be to reset the early-stopping patience "
        "(the best checkpoint follows every improvement).",
    )
    log_every: int = Field(1, ge=1, description="Log loss/LR every N optimizer steps.")
    seed: int = Field(
        42, ge=0, lt=2**32, description="Seed for adapter init, shuffling and dropout (numpy's RNG takes < 2**32)."
    )
    nan_tolerance: int = Field(
        5, ge=0, description="Skipped steps with NaN/inf loss allowed before the run stops with an error."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that get every metrics.jsonl row (loss, lr, grad norm, tokens/s, memory, "
        "eval loss) and the resolved config, through their own libraries: `tensorboard` (event files in "
        "<output.dir>/tensorboard), `wandb` (offline in <output.dir>/wandb unless WANDB_MODE is set; `wandb sync` "
        "uploads it), `mlflow` (MLFLOW_TRACKING_URI, else a local store in <output.dir>/mlruns). Each needs its "
        "package: pip install 'lorafuse[tensorboard]' (or wandb, mlflow). A resume continues the same tracker run.",
    )
    auto_fit: bool = Field(
        False,
        description="Before training, apply `lorafuse plan`'s fastest setting that fits "
        "the GPU (micro-batch and accumulation with the effective batch kept, checkpointing, "
        "max_length as a last resort). An out-of-memory step is retried once smaller either way.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    fast_path: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused Triton kernels: auto (on a CUDA GPU with triton), on (error if unavailable), off."
    )
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="What the loss trains. sft: next-token loss on the target tokens. dpo: Direct Preference "
        "Optimization on data.format=preference pairs, against a reference model that is this model with the "
        "adapter switched off (no copy). orpo: odds-ratio preference loss plus the chosen answer's NLL, no "
        "reference. See docs/dpo.md.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="DPO's beta: rewards are beta x (log p_policy - log p_reference) of a response; larger keeps the "
        "model closer to the reference. With train.dpo_loss=ipo it is IPO's tau (target margin 1/(2 tau) per token).",
    )
    dpo_loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="DPO's pair loss. sigmoid: -log sigmoid(margin), the DPO paper's; ipo: (margin per response token "
        "- 1/(2 beta))^2, IPO (log-ratios divided by each response's token count, as TRL does).",
    )
    dpo_reference: Literal["live", "precomputed"] = Field(
        "live",
        description="Where DPO's reference log-probs come from. live: the same model with the adapter switched off, "
        "in the same micro-step (one more forward without gradients). precomputed: one pass over the data before "
        "training with the model as it starts, kept for the run (no reference forward per step; also right when "
        "training continues an existing adapter).",
    )
    orpo_lambda: float = Field(
        0.1,
        ge=0,
        description="ORPO's lambda, the weight of the odds-ratio term beside the chosen answer's NLL (0.1: the "
        "value the ORPO authors train their Mistral-ORPO models with).",
    )
    shared_prompt: Literal["auto", "on", "off"] = Field(
        "auto",
        description="dpo and orpo: run each pair's prompt once. One row holds the prompt, the chosen answer and the "
        "rejected answer, and the rejected answer does not attend to the chosen one: the same losses and gradients "
        "as two rows, with the prompt's tokens through the model once instead of twice. auto: on where the "
        "attention takes the row's 4-D mask (sdpa, eager), off with flash-attention; off: a row per answer.",
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="auto: with the fast path on one GPU, each "
        "micro-batch's forward + backward replays as one CUDA graph once its "
        "shape repeats (packed rows; padded rows are rounded to a multiple of "
        "64 on CUDA, so a few shapes); the reason is printed when it cannot.",
    )

    @field_validator("fast_path", "cuda_graphs", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        """YAML 1.1 reads a bare `off`/`on` as false/true: take them as the words the user typed."""
        return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("warmup_steps")
    @classmethod
    def _whole_steps(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a step count (>= 1) must be a whole number; use a fraction < 1 for a ratio")
        return value

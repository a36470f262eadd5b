"""Unsloth runner: FastLanguageModel on the saved local folder (HF_HUB_OFFLINE=1), QLoRA or 16-bit LoRA.

FastLanguageModel.from_pretrained(folder, max_seq_length, dtype, load_in_4bit) then get_peft_model(r, alpha,
dropout, the 7 projections, use_gradient_checkpointing="unsloth" (its offloading checkpointer) or False).
Step: model(input_ids, labels=input_ids) under bf16 autocast (Unsloth's own fused loss runs inside), backward,
clip at 1.0, the same optimizer as the HF runner (bitsandbytes' PagedAdamW8bit by default).
Unsloth patches transformers at import, which is why every stack runs in its own process.

objective dpo, as Unsloth's DPO documentation shows: the same FastLanguageModel and get_peft_model, PatchDPOTrainer(),
then TRL's DPOTrainer (as Unsloth patched it at import) on the peft model with ref_model=None (trl_dpo.py: the
same DPOConfig and timed step as the hf runner's). Gradient checkpointing is Unsloth's own from get_peft_model.
"""

from __future__ import annotations

import os

from bench_common import PROJ7, hf_loss_step, peer_optimizer, require, run, unavailable


def build(spec: dict, device):
    if spec["method"] not in ("qlora", "lora"):
        unavailable(f"this runner benchmarks Unsloth's qlora and lora, not {spec['method']}")
    if device.type != "cuda":
        unavailable("Unsloth needs CUDA")
    os.environ["HF_HUB_OFFLINE"] = "1"
    require("unsloth")  # before transformers/peft: Unsloth patches them at import
    require("bitsandbytes")
    import torch
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["folder"],
        max_seq_length=spec["seq"],
        dtype=getattr(torch, spec["dtype"]),
        load_in_4bit=spec["method"] == "qlora",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=PROJ7,
        bias="none",
        use_gradient_checkpointing="unsloth" if spec["gc"] else False,
        random_state=spec["seed"],
    )
    import unsloth

    version = {"unsloth": getattr(unsloth, "__version__", "?")}
    if spec.get("objective") == "dpo":
        return _dpo(spec, device, model, tokenizer, version)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = peer_optimizer(spec["optimizer"], params)
    model.train()
    step = hf_loss_step(model, params, optimizer, spec)
    return step, {**version, "trainable_params": sum(p.numel() for p in params)}


def _dpo(spec: dict, device, model, tokenizer, version: dict):
    for module in ("datasets", "trl"):
        require(module)
    from unsloth import PatchDPOTrainer

    PatchDPOTrainer()
    from trl_dpo import dpo_step, dpo_trainer

    step, info = dpo_step(dpo_trainer(model, tokenizer, spec, device), device)
    return step, {**version, **info}


if __name__ == "__main__":
    run(build)

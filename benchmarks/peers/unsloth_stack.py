"""Unsloth runner: FastLanguageModel on the saved local folder (HF_HUB_OFFLINE=1), QLoRA or 16-bit LoRA.

FastLanguageModel.from_pretrained(folder, max_seq_length, dtype, load_in_4bit) then get_peft_model(r, alpha,
dropout, the 7 projections, use_gradient_checkpointing="unsloth" (its offloading checkpointer) or False).
Step: model(input_ids, labels=input_ids) under bf16 autocast (Unsloth's own fused loss runs inside), backward,
clip at 1.0, the same optimizer as the HF runner (bitsandbytes' PagedAdamW8bit by default).
Unsloth patches transformers at import, which is why every stack runs in its own process.
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

    model, _ = FastLanguageModel.from_pretrained(
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = peer_optimizer(spec["optimizer"], params)
    model.train()
    step = hf_loss_step(model, params, optimizer, spec)
    import unsloth

    return step, {"unsloth": getattr(unsloth, "__version__", "?"), "trainable_params": sum(p.numel() for p in params)}


if __name__ == "__main__":
    run(build)

"""transformers + peft (+ bitsandbytes) runner: the seed's recipe in a plain loop (not TRL, same step as ours).

qlora: BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute), prepare_model_for_kbit_training
       with non-reentrant gradient checkpointing, LoRA via peft.get_peft_model.
lora:  the 16-bit model, non-reentrant gradient checkpointing, LoRA via peft.
full:  the 16-bit model, every weight trained, non-reentrant gradient checkpointing.
Step: model(input_ids, labels=input_ids) under bf16 autocast (the Trainer's bf16=True), loss.backward(),
clip at 1.0, optimizer step (bitsandbytes' PagedAdamW8bit for paged_adamw_8bit, as the seed's
optim="paged_adamw_8bit"; full fine-tuning uses --full-optimizer, torch AdamW by default).

objective dpo: the HF recipe's DPO is TRL's DPOTrainer (trl_dpo.py): the same loaded model (4-bit through
bitsandbytes for qlora) handed to DPOTrainer with a LoraConfig, as TRL's documentation shows, so TRL applies peft
itself (for a 4-bit model it casts the LoRA tensors to bf16, and calls no prepare_model_for_kbit_training) and takes
the reference from the adapter disabled (ref_model=None); non-reentrant gradient checkpointing switched on as
Trainer.train does; timed: compute_loss + backward + clip + optimizer step.
"""

from __future__ import annotations

from bench_common import PROJ7, hf_loss_step, peer_optimizer, require, run, unavailable


def _load(spec: dict, device):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"])
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if spec["method"] == "qlora":
        if device.type != "cuda":
            unavailable("bitsandbytes QLoRA (the seed's recipe) needs CUDA")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs)
    if spec["method"] != "qlora":
        model.to(device)
    model.config.use_cache = False
    return model


def build(spec: dict, device):
    if spec.get("objective") == "dpo":
        return _build_dpo(spec, device)
    require("transformers")
    if spec["method"] != "full":
        require("peft")
    if spec["method"] == "qlora" or spec["optimizer"] != "adamw":
        require("bitsandbytes")
    model = _load(spec, device)
    gc_kwargs = {"use_reentrant": False}
    if spec["method"] == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec["gc"], gradient_checkpointing_kwargs=gc_kwargs
        )
    elif spec["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if spec["method"] == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer_name = spec.get("full_optimizer", "adamw")
    else:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(spec))
        optimizer_name = spec["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = peer_optimizer(optimizer_name, params)
    model.train()
    step = hf_loss_step(model, params, optimizer, spec)
    return step, {"optimizer": optimizer_name, "trainable_params": sum(p.numel() for p in params)}


def _lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=PROJ7,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _build_dpo(spec: dict, device):
    if spec["method"] not in ("qlora", "lora"):
        unavailable(f"the DPO benchmark trains adapters (qlora, lora), not {spec['method']}")
    for module in ("transformers", "peft", "datasets", "trl") + (
        ("bitsandbytes",) if spec["method"] == "qlora" else ()
    ):
        require(module)
    if spec["optimizer"] != "adamw":
        require("bitsandbytes")
    from transformers import AutoTokenizer
    from trl_dpo import dpo_step, dpo_trainer

    model = _load(spec, device)
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    trainer = dpo_trainer(model, tokenizer, spec, device, peft_config=_lora_config(spec))
    if spec["gc"]:  # what Trainer.train does first with gradient_checkpointing=True
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return dpo_step(trainer, device)


if __name__ == "__main__":
    run(build)

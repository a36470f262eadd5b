"""TRL's DPOTrainer as the peers' DPO step (hf_stack.py and unsloth_stack.py with objective dpo).

The trainer is built as its documentation shows: DPOTrainer(model, ref_model=None, args=DPOConfig(beta 0.1, the
default sigmoid loss, bf16/fp16 mixed precision as the compute dtype, gradient checkpointing non-reentrant),
train_dataset, processing_class), with a peft_config for a plain transformers model (TRL wraps it with peft and,
with ref_model=None, takes the reference from the same model with the adapter disabled) or an already wrapped
model (Unsloth's). What `Trainer.train` does before its loop is done here by hand, so that no data loader runs:
the optimizer from the trainer (`create_optimizer`, DPOConfig's `optim`), `accelerator.prepare(model, optimizer)`
(the mixed-precision autocast around the forward). One step is then what the Trainer does per micro-batch:

    model.train(); loss = trainer.compute_loss(model, batch)      # policy + reference forward, TRL's metrics
    accelerator.backward(loss); accelerator.clip_grad_norm_(params, 1.0); optimizer.step(); model.zero_grad()

The batch is the harness's pairs (bench_common.make_pair_batches) turned into TRL's inputs by the trainer's own
collator before timing (`step.prepare`): prompt ids, chosen ids, rejected ids per pair -> input_ids, attention_mask,
completion_mask of 2P rows, chosen rows first.
"""

from __future__ import annotations

import shutil
import tempfile

from bench_common import DPO_BETA

# the harness's --optimizer -> TrainingArguments.optim
OPTIM = {"paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_8bit", "adamw": "adamw_torch"}


def dpo_trainer(model, tokenizer, spec: dict, device, peft_config=None):
    """A DPOTrainer on `model` for the spec's shape (reference: ref_model=None, TRL's default with peft)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    half = spec["dtype"] in ("bfloat16", "float16") and device.type == "cuda"
    scratch = tempfile.mkdtemp(prefix="bench-trl-")  # the Trainer wants an output folder; nothing is saved into it
    args = DPOConfig(
        output_dir=scratch,
        beta=DPO_BETA,
        loss_type="sigmoid",
        max_length=spec["seq"],
        per_device_train_batch_size=spec["pairs"],
        learning_rate=2e-4,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=OPTIM[spec["optimizer"]],
        bf16=half and spec["dtype"] == "bfloat16",
        fp16=half and spec["dtype"] == "float16",
        use_cpu=device.type == "cpu",
        gradient_checkpointing=bool(spec["gc"]),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no",
        report_to="none",
        seed=spec["seed"],
    )
    # the trainer tokenizes a data set at construction; the timed batches are made by the harness instead
    rows = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    try:
        return DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def dpo_step(trainer, device):
    """(step, info): one optimizer step of `trainer` on a prepared batch, as the Trainer's loop makes it."""
    import torch

    optimizer = trainer.create_optimizer()
    model, optimizer = trainer.accelerator.prepare(trainer.model, optimizer)

    def step(batch):
        model.train()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        optimizer.step()
        model.zero_grad()
        return loss.detach()

    def prepare(batch: dict) -> dict:
        """The harness's pair batch -> the trainer's collated inputs on the device."""
        pairs, prompt = batch["num_pairs"], batch["prompt_tokens"]
        ids = batch["input_ids"].cpu()
        examples = [
            {
                "prompt_ids": ids[i, :prompt].tolist(),
                "chosen_ids": ids[i, prompt:].tolist(),
                "rejected_ids": ids[pairs + i, prompt:].tolist(),
            }
            for i in range(pairs)
        ]
        collated = trainer.data_collator(examples)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collated.items()}

    step.prepare = prepare
    return step, info(trainer)


def info(trainer) -> dict:
    """What the row records of a TRL DPO run: versions, loss, the reference and the trainable tensors."""
    import importlib.metadata as md

    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    ref = "ref" in getattr(model, "peft_config", {})
    versions = {}
    for name in ("trl", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "trainer": f"{type(trainer).__module__}.{type(trainer).__name__}",
        **versions,
        "beta": trainer.args.beta,
        "loss_type": trainer.args.loss_type,
        "reference": "a frozen copy of the adapter ('ref')" if ref else "this model with the adapter disabled",
        "optimizer": getattr(trainer.args.optim, "value", trainer.args.optim),
        "adapter_dtype": str(params[0].dtype).replace("torch.", "") if params else None,
        "trainable_params": sum(p.numel() for p in params),
    }

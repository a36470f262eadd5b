"""The run's data, as `lorafuse train` sets it up before the loop (lorafuse/job.py): the tokens the run adds or
trains (new special tokens, untrained rows the data uses), the train and validation Batchers, and the prompt format
every adapter of the run records."""

from __future__ import annotations

from pathlib import Path

from lorafuse.data import Batcher, build_datasets
from lorafuse.data.build import resolve_template
from lorafuse.data.cache import tokens_fingerprint
from lorafuse.data.collate import CUDA_PAD_MULTIPLE
from lorafuse.data.templates import trained_chat_template
from lorafuse.model.new_tokens import add_run_tokens
from lorafuse.model.prompt_format import PromptFormat
from lorafuse.model.untrained_tokens import rows_for_run
from lorafuse.model_state import model_state


def batchers(cfg, tokenizer, out: Path, console, world):
    """The train and validation Batchers of the config's data (tokenized once, cached), the data fingerprint and
    the data statistics (printed)."""
    dc, tc = cfg.data, cfg.train
    with world.main_first():  # rank 0 tokenizes and writes the cache, then the others read it
        train_ds, val_ds, stats = build_datasets(
            dc, tokenizer, seed=tc.seed, cache_dir=dc.cache_dir or str(out / ".cache")
        )
    for line in stats.summary():
        console.print(line, highlight=False)
    # On CUDA, padded rows are padded to a multiple of 64: a few distinct shapes, so CUDA graphs can capture them
    # (training/graphs.py), and tensor-core friendly sizes; the pads carry no loss and no attention.
    multiple = CUDA_PAD_MULTIPLE if world.device.type == "cuda" and not dc.packing else 1
    common = dict(
        pairs=dc.format == "preference",  # DPO/ORPO batch pairs: a pair's chosen and rejected rows together
        pad_id=tokenizer.pad_token_id,
        packing=dc.packing,
        max_length=dc.max_length,
        seed=tc.seed,
        pad_to_multiple_of=multiple,
    )
    train_b = Batcher(
        train_ds, tc.micro_batch_size, shuffle=dc.shuffle, num_shards=world.size, shard=world.rank, **common
    )  # validation stays whole: evaluate() strides over it, so no batch is dropped
    # Eval batches are never larger than train micro-batches unless asked: eval must not be what OOMs.
    val_b = (
        Batcher(val_ds, tc.eval_batch_size or tc.micro_batch_size, shuffle=False, **common)
        if val_ds is not None and len(val_ds)
        else None
    )
    return train_b, val_b, tokens_fingerprint(train_ds, val_ds), stats


def add_config_tokens(cfg, model, tokenizer, console) -> list[int]:
    """`add_run_tokens` with the config's settings: data.add_special_tokens, the chat template's own tokens when the
    template is a chat one, and lora.train_untrained_tokens. model None: the tokenizer and the report only."""
    chat = resolve_template(cfg.data, tokenizer) == "chat"
    return add_run_tokens(model, tokenizer, cfg.data.add_special_tokens, chat, cfg.lora.train_untrained_tokens, console)


def model_and_data(cfg, model, tokenizer, out: Path, console, world):
    """The run's tokens added (new and untrained rows found, set up to train) and its batchers: (train, val,
    the data fingerprint). The prompt format every adapter written records is set on the model here."""
    new_ids = add_config_tokens(cfg, model, tokenizer, console)
    train_b, val_b, fingerprint, stats = batchers(cfg, tokenizer, out, console, world)
    model_state(model).prompt = prompt_format(cfg, tokenizer, stats.template)
    datasets = (train_b.dataset, val_b.dataset if val_b is not None else None)
    rows_for_run(model, tokenizer, datasets, new_ids, cfg.lora, console, world.is_main, cfg.train.seed)
    if world.size > 1:
        console.print(world.describe(cfg.train), highlight=False)
    return train_b, val_b, fingerprint


def prompt_format(cfg, tokenizer, template_kind: str) -> PromptFormat:
    """How the run's adapter is to be prompted (lorafuse.model.prompt_format): the data format, the template kind the
    data resolved to ("plain" | "chat", DataStats.template), its Jinja, the system prompt and the EOS token."""
    dc = cfg.data
    chat = trained_chat_template(dc.format, template_kind, tokenizer, dc.prompt_format)
    return PromptFormat(chat, dc.system_prompt, tokenizer.eos_token, dc.format, template_kind)

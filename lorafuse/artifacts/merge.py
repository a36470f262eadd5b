"""Merge a LoRA adapter into its base and save a plain transformers folder, verified and never re-quantized.

Per targeted linear, in fp32 (W (out, in), A (r, in), B (out, r), s = alpha/r or alpha/sqrt(r) with rsLoRA):

    W_base = dequantize(NF4 W)     the weights the adapter was trained against, when lorafuse.json says the base
                                   was NF4 (same blocksize / double quant / load dtype, so the same 4-bit codes)
           = W (16-bit, upcast)    for a dense-trained adapter, or with from_16bit=True
    W'     = W_base + s * B @ A                                                   LoRA, rsLoRA
    W'     = (m / ||W_base + s*B@A||_row)[:, None] * (W_base + s*B@A)             DoRA (peft's merge formula)

W' is cast once to `dtype`. Linears the adapter did not target are dequantized the same way; modules_to_save
copies (already loaded into the modules) replace the base modules; trainable token rows are written into the
embedding and head rows they replace (E[I] = R_e, W[I] = R_h; a base grown for new tokens keeps the new size).
The folder holds config.json without any quantization_config, model.safetensors, the training tokenizer + chat template,
generation_config.json whose EOS ids include the template's end-of-turn token, so
`AutoModelForCausalLM.from_pretrained` needs no lorafuse, and the adapter's prompt format in lorafuse.json (format,
chat template, system prompt, EOS) for lorafuse's generate.

Why dequantize instead of merging into the original 16-bit weights: a QLoRA adapter learned a correction to
dequantize(NF4 W), which differs from W by up to ~10% of each block's absmax; merging into W changes the function (the
"merged model forgot what it learned" reports). from_16bit=True does that anyway, with a warning, when the 4-bit
noise is unwanted; its check then reports the distance to the trained function too. (Training with a bf16 compute
dtype saw dequantize(NF4 W) rounded to bf16; the merge uses the exact fp32 values, a difference at bf16 rounding.)

Self-check: the merged folder is re-loaded with transformers (weights as stored, math in fp32) and its logits on a
few fixed prompts are compared with the adapter on the base (the training-time function, fp32 math). A correct
merge differs only by rounding each weight to `dtype`; how much that moves the logits depends on the model
(depth, cancellation in the logit sums), so the bound is measured, not assumed: the same merged model with every
weight moved by random noise of half a `dtype` spacing (the size of a rounding error; precision capped at 2^-16
so fp32 math-order noise stays below it) moves its logits by some amount; the bound is CHECK_FACTOR times that
(one random draw varies; weights that were already exact in `dtype` are perturbed by the draw but not by rounding,
so on real 16-bit bases the ratio is lower still).
A wrong base (NF4 vs 16-bit), a missing layer or a scaling error is far above it. Above the bound merge raises
and nothing is written (check=False skips the check).

Memory: the base as in training (NF4: ~0.5 byte/param, its non-quantized parts in fp32) plus the merged model in
`dtype`; the check re-loads the merged folder in fp32 (4 bytes/param) after the rest is freed.
"""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafuse.artifacts.adapter_load import (
    load_adapter,
    read_adapter_config,
    read_lorafuse_facts,
)
from lorafuse.errors import ModelError
from lorafuse.model_state import model_state
from lorafuse.outputs import atomic_folder, check_output_dir

CHECK_FACTOR = 4  # observed diff / one noise draw: 0.6-1.6 on tiny models; gross errors are >= 30x
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_CHECK_TEXTS = [
    "The quick brown fox jumps over the lazy dog. Fine-tuning adapts a model: 1 2 3 4 5 6 7 8 9 10.",
    "### 指示:\n日本の首都はどこですか?\n\n### 回答:\n日本の首都は東京です。",
]


@dataclass(frozen=True)
class MergeResult:
    """Where the merged model went and what the check measured (path-like: os.fspath / Path() work on it)."""

    path: Path
    max_logit_diff: float | None  # merged (as stored) vs the function merged into; None with check=False
    tolerance: float | None
    max_diff_vs_trained: float | None  # vs the adapter on the NF4 base it was trained on (differs with from_16bit)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def merge(
    base_path, adapter_dir, out_dir, dtype="bfloat16", from_16bit=False, check=True, max_check_tokens: int = 64
) -> MergeResult:
    """Merge `adapter_dir` into the base at `base_path`; write a plain HF model folder to `out_dir` atomically.

    dtype: "bfloat16" | "float16" | "float32" (or the torch dtype) of the saved weights.
    from_16bit: merge into the stored 16-bit weights even if the adapter was trained on an NF4 base (warns).
    check: verify the saved model's logits against the adapter on its base (see module docstring); raise if off.
    """
    out_dtype = _out_dtype(dtype)
    read_adapter_config(adapter_dir)  # fail on a bad adapter folder before loading any model
    # Before any model loads: never the adapter's or the base's folder, nor one lorafuse merge did not write.
    check_output_dir(out_dir, "merge", {"adapter": adapter_dir, "base model": base_path})
    trained = (read_lorafuse_facts(adapter_dir) or {}).get("base")
    if trained is None:
        warnings.warn(
            f"{adapter_dir} has no lorafuse.json (not saved by lorafuse), so how the base was quantized in "
            "training is unknown: merging into the base weights as stored",
            stacklevel=2,
        )
        trained = {"quant": "none"}
    trained_nf4 = trained.get("quant") == "nf4"
    model, tokenizer = load_for_merge(base_path, adapter_dir, trained, nf4=trained_nf4)
    # the training tokenizer: its chat template, and any tokens the adapter added, are what the check must cover
    inputs = _check_inputs(training_tokenizer(adapter_dir, tokenizer), max_check_tokens) if check else []
    trained_logits = _logits(model, inputs)
    target_logits = trained_logits
    if from_16bit and trained_nf4:
        warnings.warn(
            "from_16bit=True: merging into the original 16-bit weights, but the adapter was trained on "
            "their NF4 4-bit version, so the merged model differs from what was trained (the check "
            "reports by how much)",
            stacklevel=2,
        )
        del model
        gc.collect()
        model, tokenizer = load_for_merge(base_path, adapter_dir, trained, nf4=False)
        if model_state(model).base.get("quant") == "nf4":
            raise ModelError(
                f"from_16bit=True, but {base_path} holds only 4-bit weights",
                "pass the original 16-bit base model folder, or drop from_16bit",
            )
        target_logits = _logits(model, inputs)
    merge_into_dense(model, out_dtype)
    tokenizer = training_tokenizer(adapter_dir, tokenizer)
    with atomic_folder(out_dir, "merge") as tmp:
        _save_merged(model, tokenizer, tmp)
        _save_prompt_format(tmp, adapter_dir)
        del model
        gc.collect()
        if not check:
            return MergeResult(Path(out_dir), None, None, None)
        diff, tol, vs_trained = _verify(tmp, inputs, out_dtype, target_logits, trained_logits)
    return MergeResult(Path(out_dir), diff, tol, vs_trained)


def _verify(folder: Path, inputs, dtype, target_logits, trained_logits) -> tuple[float, float, float]:
    """Re-load the merged folder with transformers, compare logits, raise above the measured bound."""
    merged = _reload(folder)
    got = _logits(merged, inputs)
    tol = CHECK_FACTOR * rounding_noise(merged, inputs, dtype, got)
    del merged
    diff, vs_trained = _max_diff(got, target_logits), _max_diff(got, trained_logits)
    print(
        f"merge check: max |logit diff| {diff:.3g} (bound {tol:.3g} = {CHECK_FACTOR}x {_name(dtype)} rounding noise)"
        + (f"; vs the NF4-trained function {vs_trained:.3g}" if target_logits is not trained_logits else "")
    )
    if not diff <= tol:
        raise ModelError(
            f"the merged model's logits differ from the adapter's by {diff:.3g} (bound {tol:.3g}), so "
            "the merge did not reproduce the adapter; nothing was written",
            "report this with the numbers above (a lorafuse bug, or a model whose forward is not "
            "deterministic); check=False writes the folder anyway",
        )
    return diff, tol, vs_trained


def _out_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelError(f"merge dtype {dtype!r} is not supported", "use bfloat16, float16 or float32")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_for_merge(base_path, adapter_dir, trained: dict, nf4: bool, dense_dtype=torch.float32, upcast=True):
    """The base loaded as in training (NF4: the same load dtype and quantization, hence the same 4-bit codes; dense:
    in `dense_dtype`), upcast to fp32 math unless upcast=False (NF4 layers then dequantize to fp32), with the adapter
    on it (none when adapter_dir is None)."""
    from lorafuse.model.load import load_model

    if nf4:
        model, tok = load_model(
            base_path,
            quant="nf4",
            compute_dtype=trained.get("compute_dtype") or "float32",
            device="cpu",
            blocksize=int(trained.get("blocksize") or 64),
            double_quant=bool(trained.get("double_quant", True)),
        )
    else:
        model, tok = load_model(base_path, quant="none", compute_dtype=dense_dtype, device="cpu")
    if upcast:
        model.float()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model, tok


@torch.no_grad()
def merge_into_dense(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every LoRALinear by nn.Linear(W' in `dtype`) and every NF4Linear by its fp32 dequantization cast to
    `dtype`; cast the rest to `dtype`. In place, one layer at a time (the fp32 temporaries are per layer)."""
    from lorafuse.lora import token_rows
    from lorafuse.lora.linear import LoRALinear, NF4Linear

    token_rows.fold(model)  # trainable token rows written into the embedding and head (fp32 tables here)
    for name, module in list(model.named_modules()):
        if not isinstance(module, (LoRALinear, NF4Linear)):
            continue
        w = merged_weight(module)
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=dtype
        )
        linear.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model.to(dtype)


@torch.no_grad()
def merged_weight(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) fp32 weight a LoRALinear or NF4Linear stands for: the base (NF4 dequantized in fp32) plus
    s * B @ A (DoRA: with its rows rescaled). The one formula merge and export share."""
    from lorafuse.lora import dora
    from lorafuse.lora.linear import LoRALinear

    if not isinstance(module, LoRALinear):
        return module.weight.dequantize(torch.float32)
    w = module.weight.dequantize(torch.float32) if module.is_nf4 else module.weight.detach().float()
    delta = module.delta_weight().to(w.device)
    return dora.merged_weight(w, delta, module.lora_magnitude_vector)[0] if module.use_dora else w + delta


def training_tokenizer(adapter_dir, base_tokenizer):
    """The tokenizer saved with the adapter (the exact chat template trained with), else the base's."""
    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return base_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(adapter_dir))


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant reply (e.g. <|im_end|>, <|eot_id|>)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "lorafuse-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:  # templates may reject this conversation shape; then there is nothing to learn from it
        return None
    after = text.partition(probe)[2]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if ids and ids[0] in added and added[ids[0]].special:
        return ids[0]
    return None


def _save_merged(model, tokenizer, folder: Path) -> None:
    from transformers import GenerationConfig

    if hasattr(model.config, "quantization_config"):  # a 4-bit base's; the merged weights are plain dtype
        delattr(model.config, "quantization_config")
    gen = model.generation_config or GenerationConfig.from_model_config(model.config)
    eos = [
        tokenizer.eos_token_id,
        *(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]),
        end_of_turn_id(tokenizer),
    ]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen._from_model_config = False  # edited on purpose: older transformers would re-derive it from config.json
    model.generation_config = gen
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _save_prompt_format(folder: Path, adapter_dir) -> None:
    """The adapter's prompt format (lorafuse.json's keys) into the merged folder's lorafuse.json, so generate, chat
    and export prompt the merged model as training did (its tokenizer already holds the trained chat template)."""
    from lorafuse.model.prompt_format import FACTS_NAME, read_prompt_format
    from lorafuse.version import __version__

    prompt = read_prompt_format(adapter_dir, tokenizer_fallback=False)
    if prompt is None:
        return
    facts = {"lorafuse_version": __version__, "merged_from": str(adapter_dir), **prompt.facts()}
    (folder / FACTS_NAME).write_text(json.dumps(facts, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")


def _reload(folder: Path):
    """The merged folder as any user gets it: plain transformers, weights as stored, upcast for fp32 math."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _check_inputs(tokenizer, max_tokens: int) -> list[torch.Tensor]:
    texts = list(_CHECK_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        try:
            texts.append(
                tokenizer.apply_chat_template(
                    [
                        {"role": "user", "content": "Name three primary colors."},
                        {"role": "assistant", "content": "Red, blue and yellow."},
                    ],
                    tokenize=False,
                )
            )
        except Exception:  # a template that rejects this conversation: the plain prompts still check the merge
            pass
    return [torch.tensor([tokenizer(t)["input_ids"][:max_tokens]]) for t in texts]


@torch.no_grad()
def _logits(model, inputs) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in inputs]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@torch.no_grad()
def rounding_noise(model, inputs, dtype: torch.dtype, logits, seed: int = 0) -> float:
    """Max logit change of `model` (whose weights are already `dtype` values, held in fp32) when every weight moves
    by independent uniform noise within half a `dtype` spacing at its value (precision capped at 2^-16).

    That is the size of perturbation rounding to `dtype` causes, measured on this model and these prompts. The
    model is perturbed in place (the caller is done with it).
    """
    eps = max(torch.finfo(dtype).eps, 2.0**-16)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        _, exponent = torch.frexp(p)  # |p| in [2^(e-1), 2^e): the dtype spacing there is eps * 2^(e-1)
        spacing = torch.where(p == 0, 0.0, eps * torch.ldexp(torch.ones_like(p), exponent - 1))
        p.add_((torch.rand(p.shape, generator=g) - 0.5).to(p.device) * spacing)
    return _max_diff(_logits(model, inputs), logits)

"""merge: the saved folder loads in plain transformers and computes the adapter's function, NF4 and dense bases.

Tolerance rule (DESIGN style 2): truth = peft's adapter on the same base weights (the NF4 base as its dequantized
weights) in float64. The independent reference merge is peft's `merge_and_unload` of that fp64 model, rounded to the
output dtype and evaluated in fp32: it carries exactly the rounding a correct merge to that dtype must carry. Our
merged folder, loaded by transformers and evaluated in fp32, must be within 2x that reference's error.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig

from lorafuse.artifacts.adapter_io import save_adapter
from lorafuse.artifacts.merge import MergeResult, merge
from lorafuse.errors import ModelError
from lorafuse.lora.linear import LoRALinear
from lorafuse.model.inject import apply_lora
from lorafuse.model.load import load_model
from lorafuse.outputs import write_marker

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("The quick brown fox. 日本の首都は東京です。")["input_ids"]])


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def _train_free_adapter(base_dir, out_dir, quant, seed=0, **lora):
    """A lorafuse adapter with random non-zero B (and perturbed magnitudes / modules_to_save weights)."""
    model, tok = load_model(str(base_dir), quant=quant, compute_dtype=torch.float32, device="cpu")
    apply_lora(model, dropout=0.0, targets="all-linear", **lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.requires_grad and "lora_A" not in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std())
    save_adapter(model.eval(), out_dir, tokenizer=tok)
    return model, tok


def _peft_on(base_dir, adapter_dir, nf4_model=None):
    """peft's model (fp64) over the base, or over a dense base holding `nf4_model`'s dequantized weights."""
    dense = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if nf4_model is not None:
        for name, module in nf4_model.named_modules():
            if isinstance(module, LoRALinear) and module.is_nf4:
                dense.get_submodule(name).weight.data = module.weight.dequantize(torch.float32)
    return PeftModel.from_pretrained(dense, str(adapter_dir)).to(torch.float64).eval()


def _reference_errors(peft64, out_dtype, ids):
    """(truth logits fp64, error of the reference merge rounded to out_dtype and evaluated in fp32)."""
    truth = _logits(peft64, ids)
    ref = peft64.merge_and_unload().to(out_dtype).to(torch.float32)
    return truth, (_logits(ref, ids) - truth).abs().max().item()


CASES = [(q, d, v) for q in ("nf4", "none") for d in DTYPES for v in ("plain", "dora")] + [("none", "bfloat16", "mts")]
VARIANT_KW = {
    "plain": dict(r=4, alpha=8),
    "dora": dict(r=4, alpha=8, dora=True),
    "mts": dict(r=4, alpha=4, rslora=True, modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("quant,dtype,variant", CASES)
def test_merged_model_computes_the_adapter_function(tiny_model_dir, tmp_path, quant, dtype, variant):
    model, tok = _train_free_adapter(tiny_model_dir, tmp_path / "adapter", quant, **VARIANT_KW[variant])
    result = merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", dtype=dtype)
    assert isinstance(result, MergeResult) and result.path == tmp_path / "merged"
    ids = _ids(tok)
    peft64 = _peft_on(tiny_model_dir, tmp_path / "adapter", model if quant == "nf4" else None)
    with peft64.disable_adapter():
        no_adapter = _logits(peft64, ids)
    truth, ref_err = _reference_errors(peft64, DTYPES[dtype], ids)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)  # no lorafuse
    err = (_logits(merged, ids) - truth).abs().max().item()
    effect = (no_adapter - truth).abs().max().item()
    print(
        f"merge {quant}/{dtype}/{variant}: max |merged - adapter fn| = {err:.3e} (reference merge {ref_err:.3e}); "
        f"merge's own check {result.max_logit_diff:.3e} <= {result.tolerance:.3e}; adapter effect {effect:.3e}"
    )
    assert err <= 2 * ref_err
    assert result.max_logit_diff <= result.tolerance
    assert effect > 10 * max(ref_err, 1e-9), "the adapter must matter (else the test proves nothing)"
    assert result.tolerance < effect / 4, "merge's own check must be able to see a lost update"
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {DTYPES[dtype]}
        assert not any("lora" in k or "absmax" in k or "quant" in k for k in f.keys())


def test_merged_folder_is_plain_hf_with_eos_and_template(tiny_model_dir, tmp_path, tiny_tokenizer):
    _train_free_adapter(tiny_model_dir, tmp_path / "adapter", "nf4", r=4, alpha=8)
    merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    gen = GenerationConfig.from_pretrained(str(tmp_path / "merged"))
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tiny_tokenizer.eos_token_id in eos
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in eos  # the template's end-of-turn token
    assert gen.pad_token_id == tiny_tokenizer.pad_token_id
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == tiny_tokenizer.chat_template
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_from_16bit_warns_and_reports_distance_to_trained(tiny_model_dir, tmp_path):
    _train_free_adapter(tiny_model_dir, tmp_path / "adapter", "nf4", r=4, alpha=8)
    with pytest.warns(UserWarning, match="differs from what was trained"):
        result = merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "m16", dtype="float32", from_16bit=True)
    nf4 = merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "mnf4", dtype="float32")
    print(
        f"from_16bit: vs the merged function {result.max_logit_diff:.3e}, vs the NF4-trained function "
        f"{result.max_diff_vs_trained:.3e}; default merge vs trained {nf4.max_diff_vs_trained:.3e}"
    )
    assert result.max_logit_diff <= result.tolerance
    assert result.max_diff_vs_trained > 100 * nf4.max_diff_vs_trained
    # it really is the 16-bit weights plus the update: peft's merge over the original base
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    truth, ref_err = _reference_errors(_peft_on(tiny_model_dir, tmp_path / "adapter"), torch.float32, ids)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m16"), dtype=torch.float32)
    assert (_logits(merged, ids) - truth).abs().max().item() <= 2 * ref_err


def test_merge_from_a_prequantized_bnb_folder(tiny_model_dir, tmp_path):
    """A transformers+bitsandbytes 4-bit base folder: the merge dequantizes its stored codes; no 16-bit there."""
    from lorafuse.quant.bnb_format import write_bnb_4bit_folder

    nf4, tok = load_model(str(tiny_model_dir), quant="nf4", compute_dtype=torch.float32, device="cpu")
    quantized = {n: m.weight for n, m in nf4.named_modules() if hasattr(m, "weight") and hasattr(m.weight, "packed")}
    dense = {k: v for k, v in nf4.state_dict().items() if not any(k.startswith(n + ".weight") for n in quantized)}
    write_bnb_4bit_folder(tmp_path / "bnb", nf4.config, dense, quantized, compute_dtype=torch.float32)
    tok.save_pretrained(str(tmp_path / "bnb"))
    model, tok = _train_free_adapter(tmp_path / "bnb", tmp_path / "adapter", "nf4", r=4, alpha=8)
    result = merge(tmp_path / "bnb", tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    ids = _ids(tok)
    truth, ref_err = _reference_errors(_peft_on(tiny_model_dir, tmp_path / "adapter", model), torch.float32, ids)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    err = (_logits(merged, ids) - truth).abs().max().item()
    print(f"merge from bnb folder: max |merged - adapter fn| = {err:.3e} (reference merge {ref_err:.3e})")
    assert err <= 2 * ref_err and result.max_logit_diff <= result.tolerance
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with pytest.raises(ModelError, match="4-bit"), pytest.warns(UserWarning):
        merge(tmp_path / "bnb", tmp_path / "adapter", tmp_path / "m16", from_16bit=True)


def test_failed_check_raises_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    _train_free_adapter(tiny_model_dir, tmp_path / "adapter", "nf4", r=4, alpha=8)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("previous")
    write_marker(tmp_path / "merged", "merge", ["keep.txt"])  # an earlier merge's output, which merge may replace
    monkeypatch.setattr(
        LoRALinear, "delta_weight", lambda self: 0 * self.lora_A.weight.new_zeros(self.out_features, self.in_features)
    )  # a merge that forgets the update
    with pytest.raises(ModelError, match="differ"):
        merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [".lorafuse", "keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_peft_adapter_without_lorafuse_json_merges_into_stored_weights(tiny_model_dir, tmp_path):
    _train_free_adapter(tiny_model_dir, tmp_path / "adapter", "none", r=4, alpha=8)
    (tmp_path / "adapter" / "lorafuse.json").unlink()
    with pytest.warns(UserWarning, match="lorafuse.json"):
        result = merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert result.max_logit_diff <= result.tolerance

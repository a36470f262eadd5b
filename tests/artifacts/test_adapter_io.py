"""Adapters in peft's format: files and keys, interop both ways (same logits), NF4 base, no peft warnings, errors.

Tolerance rule (DESIGN style 2): the truth is peft's model run in float64 on the same weights; lorafuse's fp32
logits must be within 2x the error of peft's own fp32 logits from that truth. Both compute the same function in
fp32 with possibly different operation order, so their errors are of the same size; the bound cannot be tuned and
is 0 only when peft's fp32 run is exact. Every adapter has random non-zero B (and perturbed DoRA magnitudes and
modules_to_save weights), and each test checks the adapter moves the logits far more than the bound.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from lorafuse.artifacts.adapter_io import PEFT_FORMAT_VERSION, save_adapter
from lorafuse.artifacts.adapter_load import load_adapter, read_adapter_config
from lorafuse.errors import LorafuseError, ModelError
from lorafuse.lora.linear import LoRALinear
from lorafuse.model.inject import apply_lora
from lorafuse.model.load import load_model

VARIANTS = {
    "plain": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, rslora=True),
    "dora": dict(r=4, alpha=8, dora=True),
    "modules_to_save": dict(r=4, alpha=8, modules_to_save=["embed_tokens", "lm_head"]),
}


# ---------------------------------------------------------------------------------------------------------- helpers


def _ids(tokenizer) -> torch.Tensor:
    texts = ["The quick brown fox jumps over the lazy dog.", "日本の首都は東京です。富士山は高い山です。"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


@torch.no_grad()
def _randomize_lora(model, seed=0) -> None:
    """Random non-zero B, perturbed magnitudes and modules_to_save weights, so the adapter changes the function."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif "lora_A" not in name:  # a modules_to_save tensor
            p.add_(torch.randn(p.shape, generator=g) * p.std())


def _peft_logits(base, adapter_dir, ids):
    """(fp32, fp64) logits of peft over `base` (a folder or a model), loading our adapter."""
    out = []
    for dtype in (torch.float32, torch.float64):
        if isinstance(base, (str, os.PathLike)):
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        else:
            model = copy.deepcopy(base)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).to(dtype).eval()
        out.append(_logits(peft_model, ids))
    return out


def _assert_same_function(label, ours, peft32, peft64, no_adapter):
    err, ref_err = (ours - peft64).abs().max().item(), (peft32 - peft64).abs().max().item()
    effect = (no_adapter - peft64).abs().max().item()
    print(
        f"{label}: max |lorafuse - peft| = {(ours - peft32).abs().max().item():.3e}, err vs fp64 {err:.3e}, "
        f"peft fp32 err {ref_err:.3e}, adapter effect {effect:.3e}"
    )
    assert err <= 2 * ref_err, f"{label}: error {err:.3e} > 2 x peft's fp32 error {ref_err:.3e}"
    assert effect > 1e3 * max(ref_err, 1e-9), "the adapter must change the logits (else the test proves nothing)"


def _lorafuse_adapter(base_dir, out_dir, quant="none", tokenizer_too=True, **lora):
    model, tok = load_model(str(base_dir), quant=quant, compute_dtype=torch.float32, device="cpu")
    apply_lora(model, dropout=0.0, targets="all-linear", **lora)
    _randomize_lora(model)
    model.eval()
    save_adapter(model, out_dir, tokenizer=tok if tokenizer_too else None)
    return model, tok


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_messages(base_dir, adapter_dir) -> list[str]:
    """Every warning (warnings module, transformers/peft/root loggers) emitted by PeftModel.from_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    handler, loggers = _Capture(), [logging.getLogger(n) for n in ("", "transformers", "peft")]
    old_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PeftModel.from_pretrained(model, str(adapter_dir))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        hf_logging.set_verbosity(old_verbosity)
    return sorted({str(w.message) for w in caught} | set(handler.messages))


# ------------------------------------------------------------------------------------------------- files and format


def test_saved_folder_matches_peft_format(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    model, tok = _lorafuse_adapter(tiny_model_dir, out, r=4, alpha=8, dora=True, modules_to_save=["lm_head"])
    files = sorted(os.listdir(out))
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "lorafuse.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(files)
    cfg = json.loads((out / "adapter_config.json").read_text())
    peft_fields = set(LoraConfig(task_type="CAUSAL_LM").to_dict())
    extra, missing = set(cfg) - peft_fields, peft_fields - set(cfg)
    # the field set of the peft release the format follows; a newer peft may add fields (filled with their defaults
    # when it loads the file), an older one lacks some of ours (it drops them on load)
    installed, written = Version(peft.__version__), Version(PEFT_FORMAT_VERSION)
    assert not extra or installed < written, f"fields peft {installed} does not have: {extra}"
    assert not missing or installed > written, f"peft {installed} fields the file lacks: {missing}"
    assert LoraConfig.from_pretrained(str(out)).r == 4  # the installed peft reads it
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["task_type"], cfg["peft_type"], cfg["bias"]) == (
        4,
        8,
        True,
        "CAUSAL_LM",
        "LORA",
        "none",
    )
    assert cfg["inference_mode"] is True and cfg["modules_to_save"] == ["lm_head"]
    assert sorted(cfg["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        q = "base_model.model.model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.lora_A.weight").shape == (4, 64)
        assert f.get_tensor(f"{q}.lora_B.weight").shape == (64, 4)
        assert f.get_tensor(f"{q}.lora_magnitude_vector").shape == (64,)
        assert f.get_tensor("base_model.model.lm_head.weight").dtype == torch.float32
    n_lora = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert len(keys) == 3 * n_lora + 1  # A, B, magnitude per layer + lm_head
    facts = json.loads((out / "lorafuse.json").read_text())
    assert facts["base"]["quant"] == "none" and facts["base"]["compute_dtype"] == "float32"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "base_model:" in card
    assert (out / "chat_template.jinja").read_text() == tok.chat_template


def test_dtype_argument_casts_saved_tensors(tiny_model_dir, tmp_path):
    model, _ = _lorafuse_adapter(tiny_model_dir, tmp_path / "a32", r=4, alpha=8)
    save_adapter(model, tmp_path / "a16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "a16" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "a16" / "lorafuse.json").read_text())["adapter_dtype"] == ["bfloat16"]


# ------------------------------------------------------------------------------------------------ lorafuse -> peft


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch_dir", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_peft_loads_our_adapter(arch_dir, variant, request, tmp_path):
    base = request.getfixturevalue(arch_dir)
    model, tok = _lorafuse_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    ids = _ids(tok)
    ours = _logits(model, ids)
    peft32, peft64 = _peft_logits(base, tmp_path / "adapter", ids)
    no_adapter = _logits(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64), ids)
    _assert_same_function(f"{arch_dir}/{variant} lorafuse->peft", ours, peft32, peft64, no_adapter)


def test_seed_reload_code_runs_unchanged(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = load_model(str(tiny_model_dir), quant="none", compute_dtype=torch.float32, device="cpu")
    apply_lora(
        model,
        r=16,
        alpha=32,
        dropout=0.05,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    _randomize_lora(model)
    model.eval()
    save_adapter(model, "./my-lora-adapter")
    ids = _ids(tok)
    ours = _logits(model, ids)
    # the seed's reload, verbatim:
    base_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base_model, "./my-lora-adapter")
    peft32 = _logits(peft_model.eval(), ids)
    peft64 = _logits(peft_model.to(torch.float64), ids)
    no_adapter = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64), ids)
    _assert_same_function("seed reload", ours, peft32, peft64, no_adapter)


# ------------------------------------------------------------------------------------------------ peft -> lorafuse

PEFT_CONFIGS = {
    "list": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ),
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "regex+dora": dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|down_proj)", use_dora=True),
    "patterns+rslora+mts": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"up_proj": 3},
        modules_to_save=["lm_head"],
    ),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("arch_dir", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_we_load_peft_adapter(arch_dir, kind, request, tmp_path):
    base = str(request.getfixturevalue(arch_dir))
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **PEFT_CONFIGS[kind]),
    )
    _randomize_lora(peft_model, seed=1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model, tok = load_model(base, quant="none", compute_dtype=torch.float32, device="cpu")
    load_adapter(model, tmp_path / "peft")
    ids = _ids(tok)
    peft_model.eval()
    peft32 = _logits(peft_model, ids)
    peft64 = _logits(peft_model.to(torch.float64), ids)
    no_adapter = _logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), ids)
    _assert_same_function(f"{arch_dir}/{kind} peft->lorafuse", _logits(model, ids), peft32, peft64, no_adapter)
    # and back: what we save from it, peft loads to the same function
    save_adapter(model, tmp_path / "again")
    again32, again64 = _peft_logits(base, tmp_path / "again", ids)
    _assert_same_function(f"{arch_dir}/{kind} peft->lorafuse->peft", again32, peft32, peft64, no_adapter)


def test_tied_embeddings_with_modules_to_save(tmp_path):
    """lm_head tied to embed_tokens: both keys saved (peft's ensure_weight_tying), peft and we agree."""
    from lorafuse.model.tiny import save_tiny

    base = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model, tok = _lorafuse_adapter(base, tmp_path / "adapter", r=4, alpha=8, modules_to_save=["lm_head"])
    cfg = read_adapter_config(tmp_path / "adapter")
    assert cfg["ensure_weight_tying"] is True and cfg["modules_to_save"] == ["lm_head"]
    ids = _ids(tok)
    peft32, peft64 = _peft_logits(base, tmp_path / "adapter", ids)
    no_adapter = _logits(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64), ids)
    _assert_same_function("tied lm_head lorafuse->peft", _logits(model, ids), peft32, peft64, no_adapter)
    again, _ = load_model(str(base), quant="none", compute_dtype=torch.float32, device="cpu")
    load_adapter(again, tmp_path / "adapter")
    _assert_same_function("tied lm_head reload", _logits(again, ids), peft32, peft64, no_adapter)


def test_load_adapter_trainable_flag(tiny_model_dir, tmp_path):
    _lorafuse_adapter(tiny_model_dir, tmp_path / "a", r=4, alpha=8, modules_to_save=["lm_head"])
    frozen, _ = load_model(str(tiny_model_dir), quant="none", compute_dtype=torch.float32, device="cpu")
    load_adapter(frozen, tmp_path / "a")
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    live, _ = load_model(str(tiny_model_dir), quant="none", compute_dtype=torch.float32, device="cpu")
    load_adapter(live, tmp_path / "a", is_trainable=True)
    names = {n for n, p in live.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("lm_head") for n in names)
    assert "lm_head.weight" in names


# ---------------------------------------------------------------------------------------------------------- NF4 base


def test_nf4_adapter_matches_peft_on_dequantized_base(tiny_model_dir, tmp_path):
    """Our adapter on our NF4 base == peft's adapter on a dense base holding our dequantized NF4 weights."""
    model, tok = _lorafuse_adapter(tiny_model_dir, tmp_path / "adapter", quant="nf4", r=4, alpha=8, dora=True)
    facts = json.loads((tmp_path / "adapter" / "lorafuse.json").read_text())
    assert facts["base"]["quant"] == "nf4" and facts["base"]["blocksize"] == 64 and facts["base"]["double_quant"]
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    n_nf4 = 0
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.is_nf4:
            dense.get_submodule(name).weight.data = module.weight.dequantize(torch.float32)
            n_nf4 += 1
    assert n_nf4 == 14
    ids = _ids(tok)
    no_adapter = _logits(dense.double(), ids)
    dense.float()
    peft32, peft64 = _peft_logits(dense, tmp_path / "adapter", ids)
    _assert_same_function("NF4 lorafuse vs peft on dequantized", _logits(model, ids), peft32, peft64, no_adapter)


# --------------------------------------------------------------------------------------------------------- warnings


@pytest.mark.parametrize("variant", ["plain", "dora", "modules_to_save"])
def test_peft_loads_ours_without_warnings(tiny_model_dir, tmp_path, variant):
    """No message beyond what peft prints for its own adapter of the same settings (peft 0.21.2 on transformers
    5.24 itself warns that `is_gradient_checkpointing` is deprecated, for any adapter)."""
    lora = VARIANTS[variant]
    _lorafuse_adapter(tiny_model_dir, tmp_path / "ours", **lora)
    peft_cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora["r"],
        lora_alpha=lora["alpha"],
        target_modules="all-linear",
        use_dora=lora.get("dora", False),
        modules_to_save=lora.get("modules_to_save"),
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), peft_cfg).save_pretrained(
        str(tmp_path / "theirs")
    )
    ours, theirs = (
        _load_messages(tiny_model_dir, tmp_path / "ours"),
        _load_messages(tiny_model_dir, tmp_path / "theirs"),
    )
    print(f"peft messages for our adapter: {ours}; for peft's own: {theirs}")
    assert set(ours) <= set(theirs), f"peft warns about our adapter: {set(ours) - set(theirs)}"
    assert not any("Unexpected keyword" in m or "missing adapter keys" in m for m in ours)
    # control: the capture does see peft's warning about an unknown config key (why lorafuse.json exists)
    cfg_path = tmp_path / "ours" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "lorafuse_blocksize": 64}))
    assert any("Unexpected keyword" in m for m in _load_messages(tiny_model_dir, tmp_path / "ours"))


# ----------------------------------------------------------------------------------------------------------- errors


def test_adapter_for_another_base_names_both(tiny_model_dir, tmp_path):
    from lorafuse.model.tiny import save_tiny

    _lorafuse_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=8)
    other = save_tiny(tmp_path / "wider", "llama", hidden_size=96, intermediate_size=128)
    model, _ = load_model(str(other), quant="none", compute_dtype=torch.float32, device="cpu")
    with pytest.raises(ModelError) as err:
        load_adapter(model, tmp_path / "adapter")
    msg = str(err.value)
    assert str(tiny_model_dir) in msg and str(other) in msg and "shapes differ" in msg
    assert not any(isinstance(m, LoRALinear) for m in model.modules()), "the model must be left untouched"


def test_missing_and_unexpected_tensors_are_listed(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    _lorafuse_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=8)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(path))
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    del sd[gone]
    sd["base_model.model.model.layers.0.mlp.bogus.lora_A.weight"] = torch.ones(4, 64)
    save_file(sd, str(path))
    model, _ = load_model(str(tiny_model_dir), quant="none", compute_dtype=torch.float32, device="cpu")
    with pytest.raises(ModelError) as err:
        load_adapter(model, tmp_path / "adapter")
    assert gone in str(err.value) and "bogus" in str(err.value)


def test_unsupported_and_missing_configs(tiny_model_dir, tmp_path):
    _lorafuse_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=8)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    model, _ = load_model(str(tiny_model_dir), quant="none", compute_dtype=torch.float32, device="cpu")
    cfg_path.write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(ModelError, match="bias"):
        load_adapter(model, tmp_path / "adapter")
    with pytest.raises(ModelError, match="not found"):
        read_adapter_config(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="adapter_config.json"):
        read_adapter_config(tiny_model_dir)  # a model folder, not an adapter


# -------------------------------------------------------------------------------------------------- atomic writes


def test_save_adapter_failure_keeps_previous_adapter(tiny_model_dir, tmp_path):
    model, _ = _lorafuse_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=8)
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "adapter", tokenizer=BrokenTokenizer())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_save_without_lora_is_an_error(tiny_model_dir, tmp_path):
    model, _ = load_model(str(tiny_model_dir), quant="none", compute_dtype=torch.float32, device="cpu")
    with pytest.raises(LorafuseError, match="apply_lora"):
        save_adapter(model, tmp_path / "adapter")

"""load_model / load_tokenizer / resolve_compute_dtype on tiny offline models."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lorafuse.errors import ModelError
from lorafuse.model.load import load_model, load_tokenizer, resolve_compute_dtype
from lorafuse.model_state import model_state


def _ids(n=12, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (2, n), generator=g)


def test_dense_load_matches_transformers(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), quant="none", compute_dtype=torch.float32, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff == 0.0
    assert not any(p.requires_grad for p in model.parameters())
    assert model_state(model).base["quant"] == "none"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_nf4_quantizes_every_linear_but_head(fixture, request):
    from lorafuse.lora.linear import NF4Linear

    folder = request.getfixturevalue(fixture)
    model, _ = load_model(str(folder), quant="nf4", compute_dtype=torch.float32, device="cpu")
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    nf4 = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert plain == ["lm_head"]
    assert len(nf4) == 7 * model.config.num_hidden_layers


def test_nf4_logits_equal_dense_model_with_dequantized_weights(tiny_model_dir):
    """The NF4 model computes exactly what a dense model holding the dequantized weights computes."""
    from lorafuse.lora.linear import NF4Linear

    model, _ = load_model(str(tiny_model_dir), quant="nf4", compute_dtype=torch.float32, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            ref.get_submodule(name).weight.data.copy_(module.weight.dequantize(torch.float32))
    ids = _ids()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    err = (got - want).abs().max().item()
    print(f"nf4 vs dense-dequantized max logit diff {err:.3g}")
    # Same weights, same fp32 math; only the matmul call differs, so differences are fp32 rounding.
    assert err <= 1e-5 * want.abs().max().item()


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(str(tmp_path / "nope"), quant="none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"), quant="none")


def test_missing_tokenizer(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-tok"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / f, folder / f)
    with pytest.raises(ModelError, match="tokenizer"):
        load_tokenizer(str(folder))


def test_pad_token_chosen_distinct_from_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token is not None and loaded.pad_token_id != loaded.eos_token_id


def test_compute_dtype_auto_and_bf16_unsupported(monkeypatch):
    assert resolve_compute_dtype("auto", "cpu") == torch.float32
    assert resolve_compute_dtype("float16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert resolve_compute_dtype("auto", "cuda") == torch.float16
    with pytest.raises(ModelError, match="float16"):
        resolve_compute_dtype("bfloat16", "cuda")
    with pytest.raises(ModelError, match="unknown compute dtype"):
        resolve_compute_dtype("float8", "cpu")


def test_builtin_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    model, tok = load_model("builtin:tiny-llama", quant="none", compute_dtype="auto", device="cpu")
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
    assert (tmp_path / "builtin").is_dir()
    with pytest.raises(ModelError, match="unknown builtin"):
        load_model("builtin:nope", quant="none")

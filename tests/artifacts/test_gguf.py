"""GGUF export read back with gguf's own reader: every tensor is the merged model's (lorafuse.merge's float32 folder is
the reference) within the type's precision, and the metadata llama.cpp needs is complete and right.

Precision rules: f32 exact; f16 / bf16 exactly the reference rounded to that type; q8_0 within the quantizer's own
bound per block of 32 (d = max|w| / 127 kept as f16: |w - q·d16| <= d/2 + 127·|d - d16|) and byte-equal to gguf's
quantizer applied to the reference; other block types byte-equal to gguf's quantizer on the reference.
The q/k rows of Llama are compared after the reordering llama.cpp's rope expects, written here as an index list
(independently of the export's reshape).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from tiny_trained import CONVERSATIONS, tiny_base  # noqa: E402

from lorafuse.artifacts.export import export  # noqa: E402
from lorafuse.errors import LorafuseError, ModelError  # noqa: E402


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def norm_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Row 2j of each head <- row j, row 2j+1 <- row j + d/2 (llama.cpp's adjacent-pair rope layout)."""
    d = w.shape[0] // heads
    order = [h * d + j + half for h in range(heads) for j in range(d // 2) for half in (0, d // 2)]
    return w[order]


def reference(merged_dir, arch: str) -> dict[str, torch.Tensor]:
    """The merged float32 weights under their GGUF names, q/k rows in llama.cpp's order for Llama."""
    config = json.loads((merged_dir / "config.json").read_text())
    state = load_file(str(merged_dir / "model.safetensors"))
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch]
    names = gguf.get_tensor_name_map(model_arch, config["num_hidden_layers"])
    out = {}
    for key, value in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and ".attn_q." in name:
            value = norm_rope_rows(value, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            value = norm_rope_rows(value, config["num_key_value_heads"])
        out[name] = value.float()
    if config.get("tie_word_embeddings"):
        out.pop("output.weight", None)
    return out


def q8_0_bound(ref: np.ndarray) -> np.ndarray:
    blocks = ref.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    return np.broadcast_to(d / 2 + 127 * np.abs(d - d16), blocks.shape).reshape(ref.shape)


CASES = [
    ("llama-nf4", "f32"),
    ("llama-nf4", "f16"),
    ("llama-nf4", "bf16"),
    ("llama-nf4", "q8_0"),
    ("llama", "q4_0"),
    ("qwen2-mts", "f16"),
    ("qwen3", "q8_0"),
]


@pytest.mark.parametrize("name,quant", CASES)
def test_every_tensor_is_the_merged_weight(trained, merged_fp32, exported, name, quant):
    t = trained(name)
    ref = reference(merged_fp32(name), t.arch)
    got = tensors(exported(name, quant))
    assert set(got) == set(ref)
    types = gguf.GGMLQuantizationType
    for gname, r in ref.items():
        tensor = got[gname]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(r.shape)
        if r.dim() == 1 or quant == "f32":
            assert tensor.tensor_type == types.F32 and np.array_equal(values, r.numpy()), gname
        elif quant in ("f16", "bf16"):
            dtype = torch.float16 if quant == "f16" else torch.bfloat16
            assert np.array_equal(values, r.to(dtype).float().numpy()), gname
        else:
            qtype = types.Q8_0 if quant == "q8_0" or gname in ("token_embd.weight", "output.weight") else types.Q4_0
            assert tensor.tensor_type == qtype, gname
            assert np.array_equal(tensor.data.reshape(-1), gguf.quants.quantize(r.numpy(), qtype).reshape(-1)), gname
            if qtype == types.Q8_0:
                assert (np.abs(values - r.numpy()) <= q8_0_bound(r.numpy())).all(), gname


def test_the_adapter_changed_the_exported_weights(trained, exported, tmp_path):
    """Guards the test above: the base alone exports different tensors, so equality above is the adapter's."""
    t = trained("llama")
    base = tensors(export(t.base, None, tmp_path / "base.gguf", quant="f32").path)
    merged = tensors(exported("llama", "f32"))
    changed = [n for n in merged if not np.array_equal(merged[n].data, base[n].data)]
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= set(changed)


@pytest.mark.parametrize("name", ["llama-nf4", "qwen3"])
def test_metadata_is_complete(trained, exported, tiny_tokenizer, name):
    t = trained(name)
    config = json.loads((t.base / "config.json").read_text())
    f = fields(exported(name, "f16"))
    arch = t.arch
    assert f["general.architecture"] == arch and "lorafuse.version" in f
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    expected = {
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "block_count": config["num_hidden_layers"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "attention.key_length": head_dim,
        "rope.dimension_count": head_dim,
        "vocab_size": len(tiny_tokenizer),
    }
    for key, value in expected.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    vocab = tiny_tokenizer.get_vocab()
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    types = f["tokenizer.ggml.token_type"]
    assert types[vocab["<|im_start|>"]] == gguf.TokenType.CONTROL and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    ids = {"bos": "<s>", "eos": "</s>", "padding": "<pad>", "unknown": "<unk>", "eot": "<|im_end|>"}
    for key, token in ids.items():
        assert f[f"tokenizer.ggml.{key}_token_id"] == vocab[token], key
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False


def test_chat_template_is_the_adapters_and_renders_the_same(trained, exported, tiny_tokenizer):
    """The adapter's template (what training used) goes in; its generation markers become no-op ifs."""
    t = trained("llama")
    adapter_template = (t.adapter / "chat_template.jinja").read_text()
    stored = fields(exported("llama", "f16"))["tokenizer.chat_template"]
    assert "{% generation %}" in adapter_template and "generation %}" not in stored
    chat = [{"role": "system", "content": "Be brief."}] + [m for c in CONVERSATIONS for m in c]
    render = dict(tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.apply_chat_template(chat, chat_template=stored, **render) == (
        tiny_tokenizer.apply_chat_template(chat, chat_template=adapter_template, **render)
    )


def test_lorafuse_json_template_and_eos_win(trained, tmp_path, tiny_tokenizer):
    """CONTRACTS: lorafuse.json's chat_template / eos_token are what training used, over the tokenizer's."""
    import shutil

    t = trained("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(t.adapter, adapter)
    facts = json.loads((adapter / "lorafuse.json").read_text())
    plain = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    plain += "{% endfor %}"
    facts.update(chat_template=plain, eos_token="<|im_end|>")
    (adapter / "lorafuse.json").write_text(json.dumps(facts))
    f = fields(export(t.base, adapter, tmp_path / "m.gguf").path)
    assert f["tokenizer.chat_template"] == plain
    assert f["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_resized_vocabulary_pads_with_unused_tokens(tmp_path, tiny_tokenizer):
    """Rows past the tokenizer (a padded embedding) are exported too, as [PAD<id>] UNUSED tokens."""
    from lorafuse.model.tiny import build_tiny_model

    model = build_tiny_model("llama", tokenizer=tiny_tokenizer)
    model.resize_token_embeddings(len(tiny_tokenizer) + 7)
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    path = export(tmp_path / "base", None, tmp_path / "m.gguf", quant="f32").path
    f, got = fields(path), tensors(path)
    n = len(tiny_tokenizer) + 7
    assert got["token_embd.weight"].data.shape[0] == n and f["llama.vocab_size"] == n
    assert len(f["tokenizer.ggml.tokens"]) == n and f["tokenizer.ggml.tokens"][-1] == f"[PAD{n - 1}]"
    assert set(f["tokenizer.ggml.token_type"][len(tiny_tokenizer) :]) == {gguf.TokenType.UNUSED}


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, tiny_tokenizer):
    """llama3 rope scaling: rope_freqs holds default / scaled frequency per rotary pair (1 where unscaled)."""
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    base = tiny_base(tmp_path / "base", "llama", tiny_tokenizer, rope=rope | {"original_max_position_embeddings": 256})
    freqs = tensors(export(base, None, tmp_path / "m.gguf", quant="f16").path)["rope_freqs.weight"].data
    assert freqs.shape == (8,)  # head_dim 16
    assert freqs[0] == 1.0 and freqs[-1] == pytest.approx(8.0)  # shortest wavelength kept, longest scaled by 8


def test_lora_gguf_holds_the_adapter_pairs(trained, tmp_path):
    t = trained("llama")
    path = export(t.base, t.adapter, tmp_path / "lora.gguf", quant="f32", lora_only=True).path
    f, got = fields(path), tensors(path)
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora" and f["adapter.lora.alpha"] == 16.0
    peft = load_file(str(t.adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0."
    a = peft[prefix + "self_attn.q_proj.lora_A.weight"]
    b = peft[prefix + "self_attn.q_proj.lora_B.weight"]
    assert np.array_equal(got["blk.0.attn_q.weight.lora_a"].data, a.numpy())  # (r, in), as llama.cpp expects
    assert np.array_equal(got["blk.0.attn_q.weight.lora_b"].data, norm_rope_rows(b, 4).numpy())  # (out, r)
    assert np.array_equal(
        got["blk.1.ffn_up.weight.lora_b"].data, peft[prefix.replace("0.", "1.") + "mlp.up_proj.lora_B.weight"].numpy()
    )
    assert len(got) == 2 * 7 * 2  # 7 linears per layer, 2 layers, A and B


def test_lora_only_refuses_what_llama_cpp_cannot_hold(trained, tmp_path):
    t = trained("qwen2-mts")
    with pytest.raises(LorafuseError, match="modules_to_save"):
        export(t.base, t.adapter, tmp_path / "lora.gguf", lora_only=True)
    assert not list(tmp_path.iterdir())


def test_refuses_a_file_it_did_not_write_and_replaces_its_own(trained, tmp_path):
    t = trained("llama")
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"someone else's file")
    with pytest.raises(LorafuseError, match="not written by lorafuse"):
        export(t.base, t.adapter, foreign)
    assert foreign.read_bytes() == b"someone else's file"
    ours = tmp_path / "ours.gguf"
    export(t.base, t.adapter, ours, quant="f16")
    export(t.base, t.adapter, ours, quant="q8_0")  # a previous lorafuse export: replaced
    assert fields(ours)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_a_failure_midway_leaves_no_file(trained, tmp_path, monkeypatch):
    from lorafuse.artifacts import gguf_tensors

    t = trained("llama")
    calls = []
    real = gguf_tensors.encode

    def failing(tensor, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(tensor, qtype)

    monkeypatch.setattr(gguf_tensors, "encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export(t.base, t.adapter, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temp file


def test_unsupported_choices_are_refused_and_nothing_is_written(trained, tmp_path, tiny_tokenizer):
    t = trained("llama")
    with pytest.raises(ModelError, match="q4_k_m"):
        export(t.base, t.adapter, tmp_path / "m.gguf", quant="q4_k_m")
    gpt2 = tiny_base(tmp_path / "gpt2", "gpt2", tiny_tokenizer)
    with pytest.raises(ModelError, match="'gpt2'"):
        export(gpt2, None, tmp_path / "g.gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "g.gguf").exists()


def test_lora_gguf_scale_is_exact_for_rslora_and_rank_patterns(tiny_model_dir, tmp_path):
    """llama.cpp scales each pair by alpha / r (r from the tensor): what it computes must be each layer's s * B @ A."""
    import lorafuse
    from lorafuse.artifacts.adapter_io import lora_layers
    from lorafuse.lora.linear import LoRALinear

    model, tok = lorafuse.load_model(str(tiny_model_dir), quant="none", compute_dtype="float32", device="cpu")
    lorafuse.apply_lora(model, r=4, alpha=8, rslora=True, targets="all-linear")
    g = torch.Generator().manual_seed(0)
    odd = "model.layers.1.mlp.down_proj"  # another rank and alpha on one layer: a rank/alpha pattern on save
    old = model.get_submodule(odd)
    model.get_submodule("model.layers.1.mlp").down_proj = LoRALinear(old.weight, None, r=8, alpha=3, rslora=True)
    layers = lora_layers(model)
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g))
    lorafuse.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    path = export(tiny_model_dir, tmp_path / "adapter", tmp_path / "lora.gguf", quant="f32", lora_only=True).path
    got, alpha = tensors(path), fields(path)["adapter.lora.alpha"]
    for name, gname in [(odd, "blk.1.ffn_down.weight"), ("model.layers.0.mlp.up_proj", "blk.0.ffn_up.weight")]:
        m = layers[name]
        a, b = got[gname + ".lora_a"].data, got[gname + ".lora_b"].data
        llama_cpp_delta = alpha / a.shape[0] * (b @ a)
        assert np.allclose(llama_cpp_delta, m.delta_weight().detach().numpy(), rtol=1e-5, atol=1e-7), name

"""transformers+bitsandbytes 4-bit checkpoints: we read what they write, they load what we write.

The tiny Llama has hidden 96 and intermediate 160, so q/k/v/o/gate/up (in 96) and down (in 160) all have
in_features % 64 != 0: blocks straddle rows. bnb's native CPU 4-bit kernels assume they don't, so every
comparison decodes bnb's tensors with bnb's reference kernels (backends/default), run eagerly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lorafuse.errors import ModelError
from lorafuse.quant.bnb_format import (
    bnb_state_dict,
    from_bnb_state_dict,
    is_bnb_4bit_checkpoint,
    read_bnb_4bit_state,
    write_bnb_4bit_folder,
)
from lorafuse.quant.nf4 import quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
REF = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

# formats.md 2.4: the block transformers 5.24 writes for nf4 + double quant, bf16 compute.
EXPECTED_QUANTIZATION_CONFIG = {
    "_load_in_4bit": True,
    "_load_in_8bit": False,
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": True,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}


def bnb_reference_dequantize(packed, qs):
    """bnb's reference dequantization of a bitsandbytes QuantState (nested absmax first, then the 4-bit codes)."""
    with torch._dynamo.config.patch(disable=True):
        absmax = qs.absmax
        if qs.nested:
            absmax = (
                torch.ops.bitsandbytes.dequantize_blockwise.default.redispatch(
                    REF, qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32
                )
                + qs.offset
            )
        return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
            REF, packed, absmax, qs.blocksize, qs.quant_type, list(qs.shape), qs.dtype
        )


def dense_part(state_dict, quantized_modules):
    """The entries that are not one of a quantized module's weight keys ("<m>.weight", "<m>.weight.absmax", ...)."""
    return {k: v for k, v in state_dict.items() if k.split(".weight")[0] not in quantized_modules}


def linear4bit_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.fixture(scope="module")
def dense96_dir(tmp_path_factory):
    from lorafuse.model.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("dense96")
    build_tiny_model(
        "llama", vocab_size=300, hidden_size=96, intermediate_size=160, num_heads=4, num_kv_heads=2, seed=1
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bnb_model(dense96_dir):
    """The recipe's load: nf4, double quant, bf16 compute, on CPU (transformers quantizes with bnb on load)."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        dense96_dir, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    )


def test_we_read_what_transformers_bitsandbytes_writes(bnb_model, dense96_dir, tmp_path):
    folder = tmp_path / "bnb-saved"
    bnb_model.save_pretrained(folder, max_shard_size="64KB")  # sharded: several files + index
    assert (folder / "model.safetensors.index.json").is_file()
    assert is_bnb_4bit_checkpoint(folder) and not is_bnb_4bit_checkpoint(dense96_dir)

    dense, quantized, qc = read_bnb_4bit_state(folder)
    assert qc == EXPECTED_QUANTIZATION_CONFIG
    theirs = linear4bit_modules(bnb_model)
    assert set(quantized) == set(theirs) and len(theirs) == 14  # 7 linears x 2 layers; lm_head stays dense
    original = transformers.AutoModelForCausalLM.from_pretrained(dense96_dir, dtype=torch.bfloat16).state_dict()
    for name, module in theirs.items():
        ours, qs = quantized[name], module.weight.quant_state
        assert ours.shape == qs.shape and ours.dtype == torch.bfloat16 and ours.blocksize == 64
        assert torch.equal(ours.dequantize(), bnb_reference_dequantize(module.weight.data, qs))
        # Same 4-bit bytes, offset and nested scales as quantizing the same bf16 weight ourselves.
        again = quantize_nf4(original[name + ".weight"], 64, double_quant=True)
        assert torch.equal(ours.packed, again.packed) and ours.offset == again.offset
        assert torch.equal(ours.nested_absmax, again.nested_absmax)

    expected_dense = dense_part(bnb_model.state_dict(), theirs)
    assert set(dense) == set(expected_dense) >= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for key, value in dense.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, expected_dense[key]), key


def test_bnb_state_dict_matches_linear4bit_exactly(bnb_model):
    for name, module in list(linear4bit_modules(bnb_model).items())[:3]:
        theirs = module.state_dict(prefix=name + ".")
        ours = bnb_state_dict(from_bnb_state_dict(theirs, name + "."), name + ".")
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
            assert torch.equal(ours[key], value), key
        blob = json.loads(bytes(theirs[name + ".weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert blob["dtype"] == "bfloat16" and blob["shape"] == list(module.weight.quant_state.shape)


@pytest.mark.parametrize(("double_quant", "blocksize"), [(True, 64), (False, 128)])
def test_transformers_bitsandbytes_load_what_we_write(dense96_dir, tmp_path, double_quant, blocksize):
    base = transformers.AutoModelForCausalLM.from_pretrained(dense96_dir, dtype=torch.bfloat16)
    quantized = {
        name: quantize_nf4(m.weight.data, blocksize, double_quant)
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    }
    dense = dense_part(base.state_dict(), quantized)
    folder = write_bnb_4bit_folder(tmp_path / "ours", base.config, dense, quantized, torch.bfloat16)

    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["quantization_config"] == {**EXPECTED_QUANTIZATION_CONFIG, "bnb_4bit_use_double_quant": double_quant}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    theirs = linear4bit_modules(loaded)
    assert set(theirs) == set(quantized)
    for name, module in theirs.items():
        ours, qs = quantized[name], module.weight.quant_state
        assert module.compute_dtype == torch.bfloat16 and qs.dtype == torch.bfloat16 and qs.quant_type == "nf4"
        assert qs.blocksize == blocksize and tuple(qs.shape) == tuple(ours.shape) and qs.nested == double_quant
        assert torch.equal(module.weight.data.view(-1), ours.packed)
        assert torch.equal(qs.absmax, ours.absmax)
        if double_quant:
            assert torch.equal(qs.state2.absmax, ours.nested_absmax) and qs.offset.item() == ours.offset
            assert torch.equal(qs.state2.code, ours.nested_code)
        assert torch.equal(bnb_reference_dequantize(module.weight.data, qs), ours.dequantize())
    loaded_dense = dense_part(loaded.state_dict(), theirs)
    assert set(loaded_dense) == set(dense) and all(torch.equal(loaded_dense[k], dense[k]) for k in dense)


def test_round_trip_through_our_reader(dense96_dir, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(dense96_dir, dtype=torch.float16)
    quantized = {
        name: quantize_nf4(m.weight.data)
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    }
    dense = dense_part(base.state_dict(), quantized)
    folder = write_bnb_4bit_folder(tmp_path / "rt", base.config.to_dict(), dense, quantized, torch.float16)
    dense2, quantized2, qc = read_bnb_4bit_state(folder)
    assert qc["bnb_4bit_compute_dtype"] == "float16"
    assert set(dense2) == set(dense) and all(torch.equal(dense2[k], dense[k]) for k in dense)
    for name, w in quantized.items():
        assert torch.equal(quantized2[name].dequantize(), w.dequantize())
        assert quantized2[name].dtype == torch.float16 and quantized2[name].offset == w.offset


def _write_small(folder):
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(w)
    return write_bnb_4bit_folder(
        folder, {"model_type": "llama"}, {"norm.weight": torch.rand(40) + 0.5}, {"proj": q}, torch.bfloat16
    ), q


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unsupported_checkpoints_raise_clear_errors(tmp_path):
    folder, _ = _write_small(tmp_path / "fp4")
    _edit_config(folder, bnb_4bit_quant_type="fp4")
    with pytest.raises(ModelError, match="'fp4'.*nf4 only"):
        read_bnb_4bit_state(folder)
    folder, _ = _write_small(tmp_path / "int8")
    _edit_config(folder, load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True, _load_in_8bit=True)
    assert is_bnb_4bit_checkpoint(folder)
    with pytest.raises(ModelError, match="8-bit"):
        read_bnb_4bit_state(folder)
    folder, _ = _write_small(tmp_path / "nofile")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        read_bnb_4bit_state(folder)


def test_bad_state_dicts_raise_model_errors():
    q = quantize_nf4(torch.randn(48, 40, generator=torch.Generator().manual_seed(1)))
    sd = bnb_state_dict(q, "proj.")
    del sd["proj.weight.nested_absmax"]
    with pytest.raises(ModelError, match="proj.weight.nested_absmax"):
        from_bnb_state_dict(sd, "proj.")
    sd = bnb_state_dict(q, "proj.")
    sd["proj.weight.quant_state.bitsandbytes__fp4"] = sd.pop("proj.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ModelError, match="fp4"):
        from_bnb_state_dict(sd, "proj.")
    sd = bnb_state_dict(q, "proj.")
    sd["proj.weight.absmax"] = sd["proj.weight.absmax"][:-1]
    with pytest.raises(ModelError, match="proj.weight.absmax has"):
        from_bnb_state_dict(sd, "proj.")


def test_storage_views_and_write_refuses_non_empty_folder(tmp_path):
    folder, q = _write_small(tmp_path / "out")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ModelError, match="not empty"):
        _write_small(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    # quant_storage=bfloat16 (FSDP-QLoRA) stores the same bytes under another dtype; we read them as uint8.
    sd = bnb_state_dict(q, "p.")
    sd["p.weight"] = sd["p.weight"].view(-1).view(torch.bfloat16).view(-1, 1)
    assert torch.equal(from_bnb_state_dict(sd, "p.").dequantize(), q.dequantize())
    assert math.isclose(q.bits_per_param(), (q.nbytes() * 8) / (48 * 40))

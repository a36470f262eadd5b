"""Streaming NF4 loading and random-init NF4 models (lorafuse.model.stream).

The streaming loader must give exactly what the from_pretrained path gives (same NF4 bytes, same logits), hold at
most one shard and one tensor in flight on the host, and, on a GPU, the final model plus one 16-bit tensor and the
quantizer's bounded temporaries on the device.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lorafuse.errors import ModelError
from lorafuse.lora.linear import NF4Linear
from lorafuse.model.load import _load_dense, load_model, quantize_linears
from lorafuse.model.random_init import random_nf4_model
from lorafuse.model.stream import QUANT_CHUNK_ELEMS, StreamUnsupported, load_nf4_streaming, quantize_chunked
from lorafuse.model_state import model_state
from lorafuse.quant.nf4 import NF4Weight, quantize_nf4

TINY = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.02,
}


def _ids(n=12, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (2, n), generator=g)


def _nf4(model) -> dict[str, NF4Weight]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def _assert_same_nf4(a: NF4Weight, b: NF4Weight, name=""):
    assert (a.shape, a.dtype, a.blocksize, a.offset) == (b.shape, b.dtype, b.blocksize, b.offset), name
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax), name
    assert (a.nested_absmax is None) == (b.nested_absmax is None), name
    if a.nested_absmax is not None:
        assert torch.equal(a.nested_absmax, b.nested_absmax) and torch.equal(a.nested_code, b.nested_code), name


def _assert_same_model(got, want):
    """Byte-identical NF4 data, equal dense parameters and buffers, and bit-identical logits."""
    got_nf4, want_nf4 = _nf4(got), _nf4(want)
    assert list(got_nf4) == list(want_nf4) and got_nf4
    for name in got_nf4:
        _assert_same_nf4(got_nf4[name], want_nf4[name], name)
    for kind in ("named_parameters", "named_buffers"):
        g, w = dict(getattr(got, kind)()), dict(getattr(want, kind)())
        assert sorted(g) == sorted(w)
        for k in g:
            assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


def _from_pretrained_nf4(folder, dtype):
    """load.py's fallback path: dense from_pretrained, then quantize layer by layer."""
    model = _load_dense(str(folder), dtype, None, False)
    quantize_linears(model, "cpu", dtype)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer, tiny_model_dir, tiny_qwen2_dir):
    """Unsharded fixtures, their copies in 200KB shards, and a tied-embedding Llama in shards."""
    from lorafuse.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("stream")
    out = {"llama": tiny_model_dir, "qwen2": tiny_qwen2_dir}
    for name, src in [("llama", tiny_model_dir), ("qwen2", tiny_qwen2_dir)]:
        dst = root / f"{name}-sharded"
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(dst, max_shard_size="200KB")
        tiny_tokenizer.save_pretrained(dst)
        out[f"{name}-sharded"] = dst
    dst = root / "llama-tied-sharded"
    build_tiny_model("llama", tokenizer=tiny_tokenizer, tie_word_embeddings=True, seed=1).save_pretrained(
        dst, max_shard_size="200KB"
    )
    tiny_tokenizer.save_pretrained(dst)
    out["llama-tied-sharded"] = dst
    for name, folder in out.items():
        n_files = len(list(Path(folder).glob("*.safetensors")))
        assert (n_files > 1) == name.endswith("sharded"), (name, n_files)
    return out


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("llama", torch.float32),
        ("llama-sharded", torch.float32),
        ("qwen2", torch.float32),
        ("qwen2-sharded", torch.float32),
        ("llama-tied-sharded", torch.float32),
        ("llama-sharded", torch.bfloat16),
    ],
)
def test_streaming_equals_from_pretrained_path(checkpoints, name, dtype):
    folder = checkpoints[name]
    model, _ = load_model(str(folder), quant="nf4", compute_dtype=dtype, device="cpu")
    assert model_state(model).base["loader"] == "stream"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    _assert_same_model(model, _from_pretrained_nf4(folder, dtype))
    if "tied" in name:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_in_small_chunks_and_slices_is_identical(checkpoints, monkeypatch, dtype):
    """Quantizing in 256-element chunks, and casting fp32 -> bf16 in 4 KiB row slices, changes no byte."""
    from lorafuse.model import stream

    monkeypatch.setattr(stream, "HOST_STAGING_BYTES", 4096)  # smaller than every weight matrix here
    folder = checkpoints["qwen2-sharded"]
    _assert_same_model(load_nf4_streaming(folder, "cpu", dtype, chunk_elems=256), _from_pretrained_nf4(folder, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, True), (64, False)])
def test_quantize_chunked_is_byte_identical(dtype, blocksize, double_quant):
    # Odd element count: a partial last block and an odd last nibble; 40 chunks, more than one 256-block of scales.
    w = (torch.randn(37, 1001, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
    got = quantize_chunked(w, blocksize, double_quant, chunk_elems=8 * blocksize)
    _assert_same_nf4(got, quantize_nf4(w, blocksize=blocksize, double_quant=double_quant))
    with pytest.raises(ValueError, match="multiple"):
        quantize_chunked(w, blocksize, double_quant, chunk_elems=blocksize + 2)


# --------------------------------------------------------------------------------------- key checks and fallback


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-file model folder whose state dict went through `edit`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    sd = load_file(src / "model.safetensors")
    save_file(edit(dict(sd)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_key_mismatches_raise_before_loading(tiny_model_dir, tmp_path):
    def extra(sd):
        sd["model.layers.0.mlp.extra_proj.weight"] = torch.randn(4, 4)
        return sd

    def missing(sd):
        del sd["model.layers.1.mlp.down_proj.weight"]
        return sd

    def reshaped(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 32)
        return sd

    for edit, words in [
        (extra, ["1 unexpected", "extra_proj"]),
        (missing, ["1 missing", "down_proj"]),
        (reshaped, ["shapes", "q_proj", "(64, 32) vs (64, 64)"]),
    ]:
        folder = _rewrite(tiny_model_dir, tmp_path / edit.__name__, edit)
        with pytest.raises(ModelError) as exc:
            load_nf4_streaming(folder, "cpu", torch.float32)
        assert all(w in str(exc.value) for w in words), str(exc.value)
        with pytest.raises(ModelError):  # load_model reports it too instead of falling back to from_pretrained
            load_model(str(folder), quant="nf4", compute_dtype=torch.float32, device="cpu")


def test_known_ignorable_keys_are_skipped(tiny_model_dir, tmp_path):
    def old_rotary(sd):  # checkpoints from older transformers kept a rotary table per layer
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
        return sd

    folder = _rewrite(tiny_model_dir, tmp_path / "old", old_rotary)
    _assert_same_model(
        load_nf4_streaming(folder, "cpu", torch.float32), _from_pretrained_nf4(tiny_model_dir, torch.float32)
    )


def test_bin_and_renamed_checkpoints_fall_back_to_from_pretrained(checkpoints, tmp_path):
    folder = checkpoints["llama-tied-sharded"]
    want = load_nf4_streaming(folder, "cpu", torch.float32)
    state = {k: v.contiguous() for k, v in want.state_dict().items()}
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()

    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, as_bin / f.name)
    torch.save(dense, as_bin / "pytorch_model.bin")
    # A base-model checkpoint (LlamaModel keys, no "model." prefix): transformers adds the prefix on load.
    renamed = tmp_path / "renamed"
    shutil.copytree(as_bin, renamed)
    (renamed / "pytorch_model.bin").unlink()
    save_file(
        {k.removeprefix("model."): v.contiguous() for k, v in dense.items() if k.startswith("model.")},
        renamed / "model.safetensors",
        metadata={"format": "pt"},
    )

    for alt, why in [(as_bin, "no model.safetensors"), (renamed, "becomes 'model.embed_tokens.weight'")]:
        with pytest.raises(StreamUnsupported, match=why):
            load_nf4_streaming(alt, "cpu", torch.float32)
        model, _ = load_model(str(alt), quant="nf4", compute_dtype=torch.float32, device="cpu")
        assert model_state(model).base["loader"] == "from_pretrained"
        _assert_same_model(model, want)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------- host memory


def _param_sizes(config: dict) -> dict[str, int]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    return {n: p.numel() for n, p in model.named_parameters()}


def _quantizer_allowance(n: int, chunk: int, blocksize: int = 64) -> int:
    """Temporaries of quantizing an n-element tensor in chunks of `chunk` (see lorafuse.model.stream's docstring).

    With c = min(n, chunk): quantize_nf4's four fp32-sized arrays of one chunk (fp32 copy, padded blocks, scaled
    values, int32 codes: 16 c), the fp32 block scales of the whole tensor before double quantization (4 n / bs) and
    the chunk's own packed codes and scales before they are copied into place (c / 2 + 4 c / bs).
    """
    c = min(n, chunk)
    return 16 * c + 4 * math.ceil(n / blocksize) + c // 2 + 4 * math.ceil(c / blocksize)


_HOST_PROBE = r"""
import ctypes, gc, json, sys
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: see test_host_memory_peak's docstring
import torch
from lorafuse.model.random_init import random_nf4_model
from lorafuse.model.stream import load_nf4_streaming

def status():
    fields = (line.split() for line in open("/proc/self/status"))
    return {f[0][:-1]: int(f[1]) * 1024 for f in fields if f[0] in ("VmRSS:", "VmHWM:")}

def measure(fn):
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = status()
    model = fn()
    after = status()
    mapped = [line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".safetensors")]
    return model, {"peak": after["VmHWM"] - base["VmRSS"], "after": after["VmRSS"] - base["VmRSS"],
                   "mapped": mapped}

def nbytes(model):
    from lorafuse.quant.nf4 import NF4Weight
    dense = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return dense + sum(m.weight.nbytes() for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Weight))

folder, chunk, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
from lorafuse.model.random_init import resolve_config
from lorafuse.model.stream import build_meta_model
build_meta_model(resolve_config(config), torch.bfloat16)  # import the modeling code outside the measurement
out = {}
for name, fn in [("stream", lambda: load_nf4_streaming(folder, "cpu", torch.bfloat16, chunk_elems=chunk)),
                 ("random", lambda: random_nf4_model(config, "cpu", torch.bfloat16, chunk_elems=chunk))]:
    model, out[name] = measure(fn)
    out[name]["final"] = nbytes(model)
    del model
print(json.dumps(out))
"""


def test_host_memory_peak(tmp_path):
    """Host RSS while streaming rises above what the loaded model keeps by at most one shard + one tensor in flight.

    What the load leaves resident (tensors, Python objects, allocator slack) is the model's own size; the loader's
    promise is about the excess on the way there: peak - after <= largest shard (its mapped pages) + the quantized
    tensor in flight (bf16 copy + quantizer temporaries); and no shard mapping outlives the load.

    Measured in a fresh process, VmHWM reset through /proc/self/clear_refs. What a first call leaves behind for good
    (lazy imports, library code pages, thread stacks) is in both the peak and `after`, so it cancels. glibc raises its
    mmap threshold up to 32 MiB after frees, so at this test's scale freed temporaries would stay cached in the heap
    and RSS would measure glibc's cache; at real scale (tensors > 32 MiB) every tensor allocation is an mmap that
    returns to the OS on free. Fixing the threshold at glibc's initial 128 KiB reproduces that regime here.
    """
    if not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    cfg = {**TINY, "hidden_size": 128, "intermediate_size": 1024, "num_hidden_layers": 4}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    model.save_pretrained(tmp_path, max_shard_size="512KB")
    chunk = 1 << 16
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _HOST_PROBE, str(tmp_path), str(chunk), json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    shards = [p.stat().st_size for p in tmp_path.glob("*.safetensors")]
    sizes = _param_sizes(cfg)
    # The quantized tensor in flight: its bf16 copy (2 B/elem) + the quantizer's temporaries
    in_flight = max(2 * n + _quantizer_allowance(n, chunk) for k, n in sizes.items() if k.endswith("proj.weight"))
    dense = 2 * sum(sizes.values())
    mib = 2.0**20
    for name, excess_bound in [("stream", max(shards) + in_flight), ("random", in_flight)]:
        m = got[name]
        print(
            f"\nhost, {name}: peak growth {m['peak'] / mib:.2f} MiB, resident after {m['after'] / mib:.2f} MiB "
            f"(tensors {m['final'] / mib:.2f}), excess {(m['peak'] - m['after']) / mib:.2f} MiB <= bound "
            f"{excess_bound / mib:.2f}; checkpoint {sum(shards) / mib:.2f} MiB in {len(shards)} shards, "
            f"dense bf16 {dense / mib:.2f} MiB"
        )
        # The bound would catch a loader that held the checkpoint or the dense model on the way.
        assert excess_bound < dense < sum(shards)
        assert m["peak"] - m["after"] <= excess_bound
        assert m["after"] >= m["final"]  # the measurement sees the model itself
    assert got["stream"]["mapped"] == []  # no shard stays mapped (and resident) after the load


# ----------------------------------------------------------------------------------------------- random models


def test_random_nf4_model_is_nf4_random_and_deterministic():
    from lorafuse.model.tiny import build_tiny_model

    model = random_nf4_model(TINY, "cpu", compute_dtype=torch.float32, seed=0)
    nf4 = _nf4(model)
    assert len(nf4) == 7 * TINY["num_hidden_layers"]
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
    for name, w in nf4.items():
        dense = w.dequantize(torch.float32)
        # N(0, 0.02) over >= 4096 values: the sample std is within 5% (~3 sigma); NF4 rounding moves it < 3%.
        assert abs(dense.std().item() - 0.02) < 0.08 * 0.02, name
    emb = model.get_input_embeddings().weight
    assert abs(emb.std().item() - 0.02) < 0.08 * 0.02
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in model.named_modules() if n.endswith("norm"))
    with torch.no_grad():
        logits = model(_ids()).logits
    assert logits.shape == (2, 12, 512) and torch.isfinite(logits).all() and logits.std() > 0
    # Non-persistent buffers are computed, not left as placeholders: same rotary table as a normally built model.
    ref = build_tiny_model("llama", vocab_size=512)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert model_state(model).base["quant"] == "nf4" and model_state(model).base["random_init"]

    again, other = (
        random_nf4_model(TINY, "cpu", torch.float32, seed=0),
        random_nf4_model(TINY, "cpu", torch.float32, seed=1),
    )
    for name, w in nf4.items():
        _assert_same_nf4(w, _nf4(again)[name], name)
        assert not torch.equal(w.packed, _nf4(other)[name].packed)
    assert torch.equal(emb, again.get_input_embeddings().weight)


def test_random_model_from_config_object_shape_name_and_dense():
    tied = AutoConfig.for_model(**{**TINY, "tie_word_embeddings": True})
    model = random_nf4_model(tied, "cpu", torch.float32)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    dense = random_nf4_model(TINY, "cpu", torch.bfloat16, quant="none")
    assert not _nf4(dense) and not any(p.requires_grad for p in dense.parameters())
    assert all(p.dtype == torch.bfloat16 for p in dense.parameters())
    with torch.no_grad():
        assert torch.isfinite(dense(_ids()).logits).all()
    with pytest.raises(ModelError, match="unknown model shape"):
        random_nf4_model("no-such-model-shape", "cpu")
    pytest.importorskip("lorafuse.plan.shapes")
    named = random_nf4_model("tiny", "cpu", torch.float32)
    assert named.config.hidden_size == 64 and len(_nf4(named)) == 14


# ------------------------------------------------------------------------------------------------------- GPU


def _gpu_config():
    # Linears dominate (as in real models), so the bound is well below the dense model even with 4M-element chunks.
    return {
        **TINY,
        "vocab_size": 4096,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    }


def _device_bound(config: dict, final: int, chunk: int) -> tuple[int, int]:
    """(final + largest tensor in 16-bit + quantizer allowance, dense 16-bit model bytes).

    The CUDA caching allocator rounds every block up to a multiple of 512 bytes and a few dozen tensors are alive
    at once (codes, scales, tables of the layer in flight): 64 KiB covers that rounding.
    """
    sizes = _param_sizes(config)
    linears = [n for k, n in sizes.items() if k.endswith("proj.weight")]
    bound = final + 2 * max(sizes.values()) + max(_quantizer_allowance(n, chunk) for n in linears) + (64 << 10)
    return bound, 2 * sum(sizes.values())


def _peak_on_gpu(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = fn()
    torch.cuda.synchronize()
    return model, torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [QUANT_CHUNK_ELEMS, 1 << 16])
def test_gpu_streaming_peak_is_final_plus_one_tensor(tmp_path, chunk):
    cfg = _gpu_config()
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16).save_pretrained(
            tmp_path, max_shard_size="16MB"
        )
    torch.cuda.empty_cache()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, peak, final = _peak_on_gpu(lambda: load_nf4_streaming(tmp_path, "cuda", torch.bfloat16, chunk_elems=chunk))
    bound, dense = _device_bound(cfg, final, chunk)
    print(
        f"\nGPU streaming load (chunk {chunk}): peak {peak / 2**20:.2f} MiB, final {final / 2**20:.2f} MiB, "
        f"bound {bound / 2**20:.2f} MiB, dense bf16 model {dense / 2**20:.2f} MiB"
    )
    assert bound < dense  # a loader that materialised the dense model would fail
    assert peak <= bound
    with torch.no_grad():
        assert torch.isfinite(model(_ids().cuda()).logits).all()


@pytest.mark.gpu
def test_gpu_random_model_peak_and_matches_streamed_layout():
    cfg = _gpu_config()
    model, peak, final = _peak_on_gpu(lambda: random_nf4_model(cfg, "cuda", torch.bfloat16, seed=0))
    bound, dense = _device_bound(cfg, final, QUANT_CHUNK_ELEMS)
    print(
        f"\nGPU random NF4 model: peak {peak / 2**20:.2f} MiB, final {final / 2**20:.2f} MiB, "
        f"bound {bound / 2**20:.2f} MiB, dense bf16 model {dense / 2**20:.2f} MiB"
    )
    assert bound < dense and peak <= bound
    assert len(_nf4(model)) == 7 * cfg["num_hidden_layers"]
    assert all(w.device.type == "cuda" for w in _nf4(model).values())
    with torch.no_grad():
        assert torch.isfinite(model(_ids(vocab=4000).cuda()).logits).all()

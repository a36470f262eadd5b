"""plan(), suggest(), next_smaller() and `lorafuse plan` output on real model shapes (no weights, no GPU)."""

from __future__ import annotations

import io
import json

import pytest

from lorafuse.config import load_config
from lorafuse.errors import ConfigError
from lorafuse.plan import apply_overrides, next_smaller, plan, speed, suggest
from lorafuse.plan.cli import plan_command
from lorafuse.plan.memory import GIB, estimate
from lorafuse.plan.shapes import load_shape
from lorafuse.plan.workload import resolve_targets, workload_from_config

SEED_RECIPE = [  # the seed's QLoRA recipe
    "model.path=meta-llama/Llama-2-7b-hf",
    "model.quant=nf4",
    "model.compute_dtype=bfloat16",
    "lora.r=16",
    "lora.dropout=0.05",
    "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    "data.max_length=512",
    "train.micro_batch_size=4",
    "train.grad_accum=4",
    "train.optimizer=paged_adamw_8bit",
    "train.gradient_checkpointing=true",
    'train.fast_path="off"',
    "lora.modules_to_save=null",  # load_config(None) starts from the demo, which trains its tiny head; the seed not
]


def recipe(*extra):
    return load_config(None, SEED_RECIPE + list(extra))


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(speed, "detect_gpu", lambda: None)


def test_parse_memory():
    assert speed.parse_memory("15GiB") == (15 * 2**30, None)
    assert speed.parse_memory("16GB") == (16 * 10**9, None)
    assert speed.parse_memory("80G") == (80 * 2**30, None)
    assert speed.parse_memory("1.5 GiB")[0] == 3 * 2**29
    size, card = speed.parse_memory("T4")
    assert card.name == "T4" and 14 * GIB < size < 16 * GIB
    assert speed.card_by_name("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert speed.card_by_name("NVIDIA L4").name == "L4" and speed.card_by_name("Tesla T4").name == "T4"
    with pytest.raises(ConfigError, match="GiB"):
        speed.parse_memory("lots")


def test_seed_qlora_recipe_fits_a_t4():
    p = plan(recipe(), gpu_memory="15GiB")
    assert p.fits is True
    assert 5 * GIB < p.estimate.peak < 8 * GIB  # the seed says ~6 GB; Unsloth's 7B minimum is 5 GB
    assert sum(p.estimate.components.values()) == p.estimate.peak
    assert p.suggestion["peak_gib"] * GIB <= 15 * GIB
    assert p.suggestion["tokens_per_s"] >= p.tokens_per_s


def test_bf16_lora_on_a_t4_needs_a_smaller_micro_batch():
    cfg = recipe("model.quant=none")
    p = plan(cfg, gpu_memory="15GiB")
    assert p.fits is False
    over = p.suggestion["overrides"]
    assert over["train.micro_batch_size"] < 4
    assert over["train.micro_batch_size"] * over["train.grad_accum"] == 16  # effective batch kept
    assert plan(apply_overrides(cfg, over), gpu_memory="15GiB").fits is True


def test_nothing_fits_a_70b_on_16gb(capsys):
    cfg = recipe("model.path=meta-llama/Llama-2-70b-hf")
    assert plan_command(cfg, gpu_memory="16GB", as_json=True) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["suggestion"] is None
    assert out["components"]["weights_nf4"] > 30  # GiB: 69 B params at 4.127 bits


def test_suggestion_is_a_fixed_point():
    cfg = recipe()
    over = suggest(cfg, "24GiB")
    again = apply_overrides(cfg, over)
    assert suggest(again, "24GiB") == {}
    assert plan(again, gpu_memory="24GiB").fits is True


def test_more_memory_is_never_slower():
    cfg = recipe("data.max_length=2048")
    speeds = [plan(cfg, gpu_memory=f"{g}GiB", gpu="H100").suggestion["tokens_per_s"] for g in (8, 12, 24, 40, 80)]
    assert speeds == sorted(speeds)


def test_host_embedding_then_head_then_offload_then_max_length_only_when_nothing_else_fits():
    cfg = recipe()
    w = workload_from_config(cfg)
    on_gpu = w.with_(micro_batch=1, grad_accum=16, checkpointing="on")
    hosted = on_gpu.with_(embeddings_on_host=True)
    both = hosted.with_(head_on_host=True)
    offload = both.with_(checkpointing="offload")
    assert estimate(offload).peak < estimate(both).peak < estimate(hosted).peak < estimate(on_gpu).peak
    fitted = plan(cfg, gpu_memory=estimate(on_gpu).peak).suggestion
    assert fitted["gradient_checkpointing"] == "on" and not fitted["embeddings_on_host"]
    p = plan(cfg, gpu_memory=(estimate(hosted).peak + estimate(on_gpu).peak) // 2)
    assert p.suggestion["overrides"]["train.embeddings_on_host"] is True
    assert "train.head_on_host" not in p.suggestion["overrides"]
    assert p.suggestion["gradient_checkpointing"] == "on" and any("embeddings_on_host" in n for n in p.notes)
    p = plan(cfg, gpu_memory=(estimate(both).peak + estimate(hosted).peak) // 2)
    assert p.suggestion["overrides"]["train.head_on_host"] is True
    assert p.suggestion["gradient_checkpointing"] == "on" and any("head_on_host" in n for n in p.notes)
    p = plan(cfg, gpu_memory=(estimate(offload).peak + estimate(both).peak) // 2)
    assert p.suggestion["overrides"]["train.gradient_checkpointing"] == "offload"
    assert p.suggestion["overrides"]["train.embeddings_on_host"] is True
    assert p.suggestion["overrides"]["train.head_on_host"] is True
    assert p.suggestion["max_length"] == 512 and any("offload" in n for n in p.notes)
    budget = (estimate(offload).peak + estimate(offload.with_(seq=256)).peak) // 2
    assert plan(cfg, gpu_memory=budget).suggestion["overrides"]["data.max_length"] == 256


def test_on_the_fused_kernels_the_last_tier_before_max_length_halves_the_dequantized_weight():
    """QLoRA on the fused kernels: after offload, the largest NF4 weights dequantized in halves (43 MiB at
    Llama-2-7B width: 11008 x 4096 x 2 bytes / 2), still at max_length 512; below that, max_length halves."""
    cfg = recipe("train.fast_path=on")
    w = workload_from_config(cfg)
    assert w.kernels == "fused" and w.method == "qlora"
    offload = w.with_(micro_batch=1, grad_accum=16, checkpointing="offload", embeddings_on_host=True, head_on_host=True)
    capped = offload.with_(dequant_cap_mib=43)
    assert estimate(capped).peak < estimate(offload).peak
    p = plan(cfg, gpu_memory=(estimate(capped).peak + estimate(offload).peak) // 2)
    assert p.suggestion["overrides"]["train.dequant_cap_mib"] == 43 and p.suggestion["max_length"] == 512
    assert p.suggestion["gradient_checkpointing"] == "offload"
    assert any("dequant_cap_mib" in n for n in p.notes)
    p = plan(cfg, gpu_memory=(estimate(capped).peak + estimate(capped.with_(seq=256)).peak) // 2)
    assert p.suggestion["max_length"] == 256


def test_a_tied_embedding_is_never_sent_to_the_host():
    cfg = recipe("model.path=meta-llama/Llama-3.2-1B")  # ties its embedding to the head
    w = workload_from_config(cfg).with_(micro_batch=1, grad_accum=16, checkpointing="on")
    assert w.shape.tie_word_embeddings
    p = plan(cfg, gpu_memory=estimate(w).peak - 1)
    assert p.suggestion is None or not (p.suggestion["embeddings_on_host"] or p.suggestion["head_on_host"])


def test_next_smaller_walks_down_to_the_floor():
    cfg = recipe("train.gradient_checkpointing=false")
    peaks, seen = [estimate(workload_from_config(cfg)).peak_alloc], 0
    while (over := next_smaller(cfg)) is not None:
        cfg = apply_overrides(cfg, over)
        peaks.append(estimate(workload_from_config(cfg)).peak_alloc)
        if "data.max_length" not in over:
            assert cfg.train.micro_batch_size * cfg.train.grad_accum == 16
        seen += 1
        assert seen < 20
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    assert cfg.train.micro_batch_size == 1 and cfg.train.gradient_checkpointing is True
    assert cfg.data.max_length < 128


def test_no_gpu_and_no_size_gives_no_verdict(capsys):
    p = plan(recipe())
    assert p.fits is None and p.suggestion is None and "--gpu-memory" in p.notes[0]
    assert plan_command(recipe()) == 0
    assert "predicted GPU total" in capsys.readouterr().out


def test_detected_gpu_is_used(monkeypatch):
    monkeypatch.setattr(speed, "detect_gpu", lambda: ("NVIDIA H100 80GB HBM3", 80 * GIB, 60 * GIB))
    p = plan(recipe())
    assert p.card.name == "H100 SXM"
    assert p.budget == 60 * GIB + GIB // 2  # free memory + this process's own context


def test_text_output_names_every_part(capsys):
    plan_command(recipe(), gpu_memory="15GiB")
    out = capsys.readouterr().out
    for word in ("NF4 weights", "LoRA parameters", "optimizer states", "saved activations", "fits", "tokens/s"):
        assert word in out


def test_targets_resolution():
    shape = load_shape("llama2-7b")
    assert resolve_targets(shape, r".*\.(q|v)_proj") == ("q_proj", "v_proj")
    assert resolve_targets(shape, ["self_attn.o_proj", "down_proj"]) == ("o_proj", "down_proj")
    assert len(resolve_targets(shape, "all-linear")) == 7
    with pytest.raises(ConfigError, match="matches none"):
        resolve_targets(shape, ["qkv_proj"])


def test_bf16_on_a_card_without_bf16_is_flagged():
    notes = plan(recipe(), gpu_memory="T4").notes
    assert any("no bfloat16" in n and "float16" in n for n in notes)
    assert not any("bfloat16" in n for n in plan(recipe("model.compute_dtype=float16"), gpu_memory="T4").notes)
    assert not any("bfloat16" in n for n in plan(recipe(), gpu_memory="H100").notes)


def test_memory_to_spare_buys_kept_layers_and_an_oom_gives_them_back():
    """Between the budget of full recomputation and that of none, the search keeps the last layers' activations
    (train.uncheckpointed_layers) when the speed model says that is faster; after an OOM they go first."""
    cfg = recipe("train.grad_accum=1")  # micro-batch 4, checkpointing on; the batch cannot grow instead
    w = workload_from_config(cfg)
    half = w.with_(uncheckpointed=w.shape.num_layers // 2)
    assert estimate(w).peak < estimate(half).peak < estimate(w.with_(checkpointing="off")).peak
    card = speed.card_by_name("H100")
    assert speed.tokens_per_second(half, card) > speed.tokens_per_second(w, card)
    p = plan(cfg, gpu_memory=estimate(half).peak, gpu="H100")
    kept = p.suggestion["overrides"].get("train.uncheckpointed_layers", 0)
    assert kept >= w.shape.num_layers // 2 and p.suggestion["gradient_checkpointing"] == "on"
    out = io.StringIO()
    plan_command(cfg, gpu_memory=estimate(half).peak, gpu="H100", file=out)
    assert "layers keep activations" in out.getvalue()
    smaller = next_smaller(recipe("train.grad_accum=1", f"train.uncheckpointed_layers={kept}"))
    assert smaller == {"train.uncheckpointed_layers": 0}


def test_the_fused_recompute_without_down_proj_is_priced():
    """With the fused kernels a checkpointed layer's recompute leaves out down_proj (kernels/swiglu_mlp.py): the
    step's FLOPs drop by one forward of down_proj in each checkpointed layer, and nothing changes without
    checkpointing or with the reference kernels."""
    w = workload_from_config(recipe("train.grad_accum=1")).with_(kernels="fused")
    s, n = w.shape, w.tokens
    down = s.intermediate_size * s.hidden_size  # Llama-2-7B: 11008 x 4096
    ref = w.with_(kernels="reference")
    assert speed.step_flops(ref) - speed.step_flops(w) == pytest.approx(2 * down * n * s.num_layers)
    kept = w.with_(uncheckpointed=8)
    assert speed.step_flops(kept.with_(kernels="reference")) - speed.step_flops(kept) == pytest.approx(
        2 * down * n * (s.num_layers - 8)
    )
    off = w.with_(checkpointing="off")
    assert speed.step_flops(off) == speed.step_flops(off.with_(kernels="reference"))


def test_fp8_shortens_the_planned_step_on_hopper_and_is_flagged_on_a_t4(capsys, monkeypatch):
    """train.fp8 on the fused kernels: the forward's and recompute's base GEMMs priced at FP8 rates on an H100, and
    with the NF4 base the backward's dX too (a 16-bit base: the forward's only, its peak bf16's since the byte buffer
    is shared). The backward's dY codes (1 byte per token and intermediate unit) may raise the peak, by no more.
    On a T4, which has no FP8 tensor cores, a note that the run would stop."""
    fused = ['train.fast_path="auto"']
    bf16 = plan(recipe(*fused), gpu_memory="80GiB", gpu="H100")
    fp8 = plan(recipe(*fused, "train.fp8=true"), gpu_memory="80GiB", gpu="H100")
    assert fp8.workload.fp8 and fp8.workload.kernels == "fused" and fp8.workload.method == "qlora"
    assert fp8.step_s < bf16.step_s
    lora_bf16 = plan(recipe(*fused, "model.quant=none"), gpu_memory="80GiB", gpu="H100")
    forward_only = plan(recipe(*fused, "model.quant=none", "train.fp8=true"), gpu_memory="80GiB", gpu="H100")
    assert forward_only.step_s < lora_bf16.step_s
    assert forward_only.estimate.peak_alloc == lora_bf16.estimate.peak_alloc
    w = fp8.workload
    assert 0 <= fp8.estimate.peak_alloc - bf16.estimate.peak_alloc <= w.tokens * w.shape.intermediate_size
    assert not any("train.fp8" in n for n in fp8.notes)
    (offer,) = [n for n in bf16.notes if "train.fp8: true" in n]
    assert f"~{fp8.step_s:.2f} s per step instead of {bf16.step_s:.2f} s" in offer and "the backward dX" in offer
    for off in (['train.fast_path="off"'], [*fused, "lora.dora=true"]):  # FP8 lives in the fused kernels only
        reference = plan(recipe(*off, "train.fp8=true"), gpu_memory="80GiB", gpu="H100")
        assert reference.step_s == plan(recipe(*off), gpu_memory="80GiB", gpu="H100").step_s
        assert any("train.fp8 runs inside the fused kernels" in n and "stop at start-up" in n for n in reference.notes)
    t4 = plan(recipe(*fused, "train.fp8=true", "model.compute_dtype=float16"), gpu_memory="15GiB", gpu="T4")
    assert any("train.fp8 needs FP8 tensor cores" in n and "T4" in n for n in t4.notes)
    plan_command(recipe(*fused, "train.fp8=true"), gpu_memory="80GiB", gpu="H100")
    assert "FP8 GEMMs (backward dX too)" in capsys.readouterr().out

"""The byte accounting: NF4 format arithmetic, optimizer states, and saved activations measured on real models."""

from __future__ import annotations

import math

import pytest
import torch

from lorafuse.plan.activations import layer_saved_bytes
from lorafuse.plan.memory import allocator_block, estimate, loss_bytes, nf4_bytes, optimizer_bytes, weight_bytes
from lorafuse.plan.shapes import ModelShape, load_shape
from lorafuse.plan.workload import Workload


def test_nf4_bytes_of_a_4096x4096_layer():
    n = 4096 * 4096
    # 4-bit codes, one uint8 absmax code per 64 weights, one fp32 scale per 256 absmax codes.
    data = n // 2 + n // 64 + 4 * (n // 64 // 256)
    assert data == 8_654_848
    parts = nf4_bytes(n, blocksize=64, double_quant=True)
    assert parts["packed"] + parts["absmax"] + parts["nested_absmax"] == data
    assert parts["tables"] == 16 * 4 + 256 * 4 + 4  # NF4 code, dynamic map, offset (fp32)
    assert round(8 * data / n, 3) == 4.127  # the QLoRA paper's bits per parameter
    single = nf4_bytes(n, blocksize=64, double_quant=False)
    assert single["packed"] + single["absmax"] == n // 2 + 4 * (n // 64)
    assert 8 * (single["packed"] + single["absmax"]) / n == 4.5


def test_nf4_bytes_of_odd_sizes_round_up():
    parts = nf4_bytes(100, blocksize=64)
    assert parts["packed"] == 50 and parts["absmax"] == 2 and parts["nested_absmax"] == 4
    parts = nf4_bytes(64 * 256 + 1, blocksize=64)
    assert parts["absmax"] == 257 and parts["nested_absmax"] == 8


def test_nf4_bytes_match_lorafuse_quantizer():
    nf4 = pytest.importorskip("lorafuse.quant.nf4")
    w = torch.randn(96, 200)
    for dq in (True, False):
        q = nf4.quantize_nf4(w, blocksize=64, double_quant=dq)
        held = q.packed.nbytes + q.absmax.nbytes + (q.nested_absmax.nbytes if q.nested_absmax is not None else 0)
        parts = nf4_bytes(w.numel(), 64, dq)
        assert held == parts["packed"] + parts["absmax"] + parts["nested_absmax"]


def test_nf4_bytes_match_a_loaded_tiny_model(tiny_model_dir):
    pytest.importorskip("lorafuse.quant.nf4")
    load = pytest.importorskip("lorafuse.model.load")
    model, _ = load.load_model(str(tiny_model_dir), quant="nf4", compute_dtype=torch.float32, device="cpu")
    held = 0
    for module in model.modules():
        q = getattr(module, "weight", None)
        if hasattr(q, "packed"):
            held += q.packed.nbytes + q.absmax.nbytes + (0 if q.nested_absmax is None else q.nested_absmax.nbytes)
    shape = load_shape(str(tiny_model_dir))
    per_linear = [nf4_bytes(lin.numel) for lin in shape.linears()]
    assert held == shape.num_layers * sum(p["packed"] + p["absmax"] + p["nested_absmax"] for p in per_linear)
    dense = sum(p.nbytes for p in model.parameters())  # embeddings, norms, head stay in the compute dtype
    assert dense == weight_bytes(Workload(shape, method="qlora", compute_bytes=4))["weights_16bit"]


def test_optimizer_states():
    big, small = 16 * 4096, 100
    assert optimizer_bytes([big, small], "adamw") == 8 * (big + small)
    # uint8 m and v + one fp32 absmax per 256 elements each; small tensors keep fp32 states.
    assert optimizer_bytes([big, small], "adamw_8bit") == 2 * big + 2 * 4 * (big // 256) + 8 * small
    # paged: lorafuse.training.optim8bit pages only under memory pressure, so the states are planned on the GPU.
    assert optimizer_bytes([big, small], "paged_adamw_8bit") == optimizer_bytes([big, small], "adamw_8bit")


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_optimizer_states_match_the_optimizer(name):
    """The planner's state bytes are what lorafuse's optimizers hold after a step (odd sizes: partial blocks)."""
    from lorafuse.training.optim import build_optimizer, state_bytes

    params = [torch.nn.Parameter(torch.randn(n)) for n in (16 * 4096 + 100, 5000, 300)]
    opt = build_optimizer(name, params, lr=1e-3, weight_decay=0.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    step_counters = 4 * len(params) if name == "adamw" else 0  # torch's AdamW: a 0-dim fp32 `step` per tensor
    assert state_bytes(opt) - step_counters == optimizer_bytes([p.numel() for p in params], name)


def _saved_bytes(
    num_layers: int,
    batch: int,
    seq: int,
    padded: bool,
    dropout: float = 0.0,
    device: str = "cpu",
    autocast: bool = False,
) -> tuple[int, dict]:
    """Bytes of the tensors autograd saves in a bf16 tiny Llama with fp32 LoRA on all linears, optionally
    under bf16 autocast (as lorafuse's training loop runs on a GPU).

    Frozen weights and per-row scalars (the (N, 1) rsqrt outputs, 0-dim scale factors) are left out; tensors
    are counted once per storage."""
    from lorafuse.model.inject import apply_lora
    from lorafuse.model.tiny import build_tiny_model

    model = build_tiny_model("llama", vocab_size=512, num_layers=num_layers).to(device, torch.bfloat16)
    apply_lora(model, r=8, alpha=16, dropout=dropout, targets="all-linear")
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (batch, seq), generator=gen).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    if padded:
        mask[0, -5:] = 0
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.numel() > batch * seq and t.untyped_storage().data_ptr() not in frozen:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    cast = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask)
    return sum(seen.values()), model.config.to_dict()


def _autocast_weight_copies(cfg: dict, r: int) -> int:
    """bf16 bytes of one layer's LoRA weights: autocast casts each A (r x in) and B (out x r) once per step."""
    D, F = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * D // cfg["num_attention_heads"]
    return 2 * r * (2 * (D + D) + 2 * (D + kv) + 3 * (D + F))


def _one_more_layer_adds_the_planned_bytes(batch, seq, padded, dropout, device, autocast) -> None:
    """What a third decoder layer adds to the saved tensors equals the planner's bytes of one layer (r = 8, bf16)."""
    three, cfg = _saved_bytes(3, batch, seq, padded, dropout, device, autocast)
    two, _ = _saved_bytes(2, batch, seq, padded, dropout, device, autocast)
    w = Workload(
        ModelShape.from_config(cfg),
        method="lora",
        micro_batch=batch,
        seq=seq,
        r=8,
        dropout=dropout,
        compute_bytes=2,
        lora_bytes=4,
        padded=padded,
        checkpointing="off",
        autocast=autocast,
    )
    copies = _autocast_weight_copies(cfg, 8) if autocast else 0
    assert three - two == layer_saved_bytes(w) * batch * seq + copies


@pytest.mark.parametrize("padded,autocast", [(False, False), (True, False), (False, True)])
def test_saved_activations_per_layer_match_autograd(padded, autocast):
    """One more decoder layer adds exactly the planner's per-layer bytes (dropout 0: the CPU dropout keeps an
    fp32 mask where CUDA keeps a bool one; the GPU test below covers dropout)."""
    _one_more_layer_adds_the_planned_bytes(2, 24, padded, 0.0, "cpu", autocast)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("autocast", [False, True])
def test_saved_activations_per_layer_match_autograd_on_cuda(dropout, autocast):
    """On CUDA, dropout keeps a bool mask (1 byte per input element), as the planner assumes."""
    _one_more_layer_adds_the_planned_bytes(2, 64, False, dropout, "cuda", autocast)


def test_checkpointing_and_chunked_loss_shrink_the_peak():
    shape = load_shape("llama3-8b")
    base = Workload(shape, micro_batch=4, seq=1024, checkpointing="off", loss="full", padded=False)
    e_off, e_on = estimate(base), estimate(base.with_(checkpointing="on"))
    e_offload = estimate(base.with_(checkpointing="offload"))
    assert e_offload.peak < e_on.peak < e_off.peak
    # Checkpointed layers keep one bf16 hidden state per token per layer.
    assert e_on.components["activations"] == pytest.approx(
        shape.num_layers * 2 * shape.hidden_size * base.tokens + 4 * shape.hidden_size * base.tokens
    )
    full, chunked = estimate(base.with_(checkpointing="on")), estimate(base.with_(checkpointing="on", loss="chunked"))
    assert full.components["logits_loss"] == (2 + 12) * shape.vocab_size * base.tokens
    # lorafuse.training.loss: 2^25 logits per chunk (fp32 + logsumexp temp + bf16 softmax) + the saved grad_hidden.
    rows = 2**25 // shape.vocab_size
    chunk_bytes = (4 + 4 + 2) * rows * shape.vocab_size
    assert loss_bytes(base.with_(loss="chunked")) == chunk_bytes + 2 * shape.hidden_size * base.tokens
    assert chunked.peak < full.peak
    assert sum(e_on.components.values()) == e_on.peak


def test_qlora_is_smaller_than_lora_by_the_linear_weights():
    shape = load_shape("llama2-7b")
    q, lo = estimate(Workload(shape, method="qlora")), estimate(Workload(shape, method="lora"))
    saved = lo.components["weights_16bit"] - q.components["weights_16bit"]
    assert saved == 2 * shape.linear_params
    exact = shape.linear_params * 4.127 / 8  # research/speed-anchors.md s.7: 3.11 GiB of tensor bytes
    mlp_weights = 3 * shape.num_layers  # 21.5 MiB of packed codes each, booked as 22 MiB blocks
    assert exact * (1 - 1e-3) <= q.components["weights_nf4"] <= exact * (1 + 1e-3) + mlp_weights * 2**19
    # measured on an H200 (benchmarks/memory_peak.py's live blocks between steps): 3232 MiB of NF4 blocks
    assert math.isclose(q.components["weights_nf4"] / 2**20, 3232, abs_tol=16)


def test_allocator_blocks_as_measured():
    """torch's caching allocator books 512-byte multiples, and a large tensor's 2 MiB-rounded segment when the
    tail is under 1 MiB: the 7B MLP's packed codes (11008 x 4096 / 2 bytes) hold 22 MiB blocks, the 4096 x 4096
    weights' 8 MiB exactly, their absmax (704,512 bytes) exactly (memory_peak.py's live blocks, H200)."""
    assert allocator_block(11008 * 4096 // 2) == 22 << 20
    assert allocator_block(4096 * 4096 // 2) == 8 << 20
    assert allocator_block(11008 * 4096 // 64) == 704512
    assert allocator_block(1) == 512
    assert allocator_block((10 << 20) + 1) == (10 << 20) + 512  # a 12 MiB segment: its 2 MiB tail is split off


def test_cuda_graphs_keep_every_gradient_alive():
    """A replay accumulates into the gradients the capture recorded and the loop zeroes them in place, so with
    graphs all of them exist in every phase, even with one micro-batch per step (measured: the 7B 4 x 512 graph
    rows sat 0.15 GiB, the LoRA gradients' size, further below the prediction than the eager rows)."""
    from lorafuse.config import load_config
    from lorafuse.plan.memory import gradient_bytes, trainable_numels
    from lorafuse.plan.workload import workload_from_config

    w = Workload(load_shape("llama2-7b"), grad_accum=1, kernels="fused", loss="fused")
    full = 4 * sum(trainable_numels(w))
    assert gradient_bytes(w)["backward"] < full
    assert set(gradient_bytes(w.with_(cuda_graphs=True)).values()) == {full}
    assert estimate(w.with_(cuda_graphs=True)).peak_alloc > estimate(w).peak_alloc
    on = workload_from_config(load_config(None, ["train.fast_path=on"]))
    off = workload_from_config(load_config(None, ["train.fast_path=on", "train.cuda_graphs=off"]))
    assert on.cuda_graphs and not off.cuda_graphs
    assert not workload_from_config(load_config(None, ["train.fast_path=off"])).cuda_graphs


def test_a_host_head_streams_at_short_micro_batches_and_is_staged_whole_at_long_ones():
    """Lean 7B (offload, both tables on the host, fused kernels): at 4 x 512 tokens the head streams through the loss
    in chunks (plan/policy.head_streams: the loss's fp32 state is smaller than the head), so the forward and the loss
    stay off the peak, which is the backward's; at 8 x 2048 it is staged whole during the forward and freed before
    the backward, still the peak."""
    from lorafuse.plan import policy
    from lorafuse.plan.placement import streamed_head

    s = load_shape("llama2-7b")
    lean = dict(kernels="fused", loss="fused", checkpointing="offload", dropout=0.0, grad_accum=1, cuda_graphs=True)
    short = Workload(s, micro_batch=4, seq=512, padded=False, embeddings_on_host=True, head_on_host=True, **lean)
    long = short.with_(micro_batch=8, seq=2048)
    head = 2 * s.vocab_size * s.hidden_size
    assert policy.head_streams(short.tokens, s.hidden_size, head) and streamed_head(short) is not None
    assert not policy.head_streams(long.tokens, s.hidden_size, head) and streamed_head(long) is None
    for w in (short, long):
        e = estimate(w)
        assert e.phase == "backward" and not e.components.get("head_staged")


def test_the_dequantization_cap_shrinks_the_planned_buffer_as_the_kernels_cut_it():
    """With train.dequant_cap_mib the planner's buffer is the largest row part the fused linear dequantizes
    (kernels/lora_linear.dequant_rows at NF4's own cut alignment), within the cap; without it, the largest weight."""
    import torch

    from lorafuse.kernels.lora_linear import dequant_rows
    from lorafuse.plan.memory import dequant_bytes
    from lorafuse.quant.nf4 import NF4Weight

    for name in ("llama2-7b", "llama3-8b"):
        w = Workload(load_shape(name), kernels="fused", loss="fused")
        whole = dequant_bytes(w)
        parts = []
        for lin in w.shape.linears():
            nf4 = NF4Weight(
                packed=torch.empty(0, dtype=torch.uint8),
                absmax=torch.empty(0, dtype=torch.uint8),
                shape=(lin.out_features, lin.in_features),
                dtype=torch.bfloat16,
                nested_absmax=torch.empty(0),
                nested_code=torch.empty(0),
                offset=0.0,
            )
            rows = dequant_rows(lin.out_features, lin.numel, nf4.row_alignment(), 2, 48 << 20)
            parts.append(2 * rows * lin.in_features)
        capped = dequant_bytes(w.with_(dequant_cap_mib=48))
        assert capped == max(parts) <= 48 << 20 < whole == 2 * max(lin.numel for lin in w.shape.linears())

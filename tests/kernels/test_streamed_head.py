"""Cross-entropy against a head streamed in vocabulary chunks (kernels/streamed_head.py) vs an fp64 oracle, and the
host head's chunk stream on a GPU (accel/host_tables.HeadStage)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafuse.kernels import streamed_head
from lorafuse.kernels.reference import fused_linear_cross_entropy_reference
from lorafuse.kernels.streamed_head import streamed_head_cross_entropy


def _data(t, hdim, vocab, device, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, hdim, generator=g)
    head = torch.randn(vocab, hdim, generator=g) / hdim**0.5 * 4  # peaked softmax
    labels = torch.randint(0, vocab, (t,), generator=g)
    labels[torch.rand(t, generator=g) < ignored] = -100
    return hidden.to(device), head.to(device), labels.to(device)


def _chunks(head, rows):
    return ((v0, head[v0 : v0 + rows]) for v0 in range(0, head.shape[0], rows))


def _streamed(hidden, head, labels, dtype, rows):
    h = hidden.detach().to(dtype).requires_grad_()
    w = head.to(dtype)
    loss = streamed_head_cross_entropy(h, labels, _chunks(w, rows), lambda y: w[y])
    (loss * 1.5).backward()  # a non-unit upstream gradient: backward must scale
    return {"loss": loss.detach().reshape(1), "dh": h.grad}


def _oracle(hidden, head, labels, dtype):
    """The fp64 loss and gradient of the inputs as the kernel gets them (rounded to `dtype`): the kernel's own
    error, not the inputs' rounding, which the same-dtype reference shares and which, for a scalar loss summed over
    rows, its own logit rounding can cancel by chance (seen on an H200: 1.0e-5 vs 3.5e-6 against fp32 inputs)."""
    return _reference(hidden.to(dtype), head.to(dtype), labels, torch.float64)


def _reference(hidden, head, labels, dtype):
    h = hidden.detach().to(dtype).requires_grad_()
    loss = fused_linear_cross_entropy_reference(h, head.to(dtype), labels, reduction="sum")
    (loss * 1.5).backward()
    return {"loss": loss.detach().reshape(1), "dh": h.grad}


@pytest.mark.parametrize(
    "t,hdim,vocab,dtype,rows,block",
    [
        (13, 32, 100, torch.float32, 7, None),  # 15 chunks, the last partial; 30% of rows ignored
        (9, 16, 300, torch.float16, 300, None),  # one chunk, the whole vocabulary
        (21, 16, 97, torch.float32, 10, 4 * 10 * 4),  # logits blocks of 4 rows: several row blocks per chunk
    ],
)
def test_streamed_loss_and_gradient_match_the_oracle(t, hdim, vocab, dtype, rows, block, parity, monkeypatch):
    """Loss and d(hidden) within the same-dtype reference's error of the fp64 oracle, whatever the chunking."""
    if block is not None:
        monkeypatch.setattr(streamed_head, "LOGITS_BLOCK_BYTES", block)
    hidden, head, labels = _data(t, hdim, vocab, "cpu")
    oracle = _oracle(hidden, head, labels, dtype)
    ref = _reference(hidden, head, labels, dtype)
    got = _streamed(hidden, head, labels, dtype, rows)
    for name in oracle:
        parity(f"streamed/{dtype}/{name}", got[name], ref[name], oracle[name])
    assert torch.all(got["dh"][labels == -100] == 0), "ignored rows get no gradient"


def test_confident_rows_keep_their_small_gradient_in_bf16(parity):
    """Rows whose label takes nearly all the probability have a gradient far smaller than the head's rows: formed
    as softmax W - W[y] from a 16-bit product it would drown in that product's rounding; the label's weight kept
    out of the GEMM leaves it as accurate as the same-dtype reference's (softmax - onehot) W."""
    hidden, head, labels = _data(24, 64, 300, "cpu", ignored=0.0)
    hidden[:16] = head[labels[:16]] * 2.0  # z_y = 2 |W_y|^2 ~ 32 against logits of order 4: p_y ~ 1 - 1e-7
    oracle = _oracle(hidden, head, labels, torch.bfloat16)
    ref = _reference(hidden, head, labels, torch.bfloat16)
    got = _streamed(hidden, head, labels, torch.bfloat16, 70)
    assert float(oracle["dh"][:16].abs().max()) < 1e-3 * float(head.abs().max())  # confident rows
    for rows in (slice(0, 16), slice(16, 24)):
        parity(f"streamed/confident/dh{rows}", got["dh"][rows], ref["dh"][rows], oracle["dh"][rows])


def test_a_large_logit_range_does_not_overflow():
    """The running maximum keeps exp() in range when a later chunk holds far larger logits than the first."""
    hidden = torch.ones(3, 4)
    head = torch.zeros(20, 4)
    head[15:] = 60.0  # logits 240 in the last chunk: exp(240) overflows fp32 without the shift
    labels = torch.tensor([0, 17, -100])
    want = F.cross_entropy(hidden.double() @ head.double().t(), labels, reduction="sum", ignore_index=-100)
    got = streamed_head_cross_entropy(hidden, labels, _chunks(head, 5), lambda y: head[y])
    assert torch.isfinite(got) and abs(float(got) - float(want)) <= 1e-5 * float(want)


def test_without_grad_only_the_loss_is_formed():
    hidden, head, labels = _data(11, 8, 40, "cpu")
    looked_up = []

    def rows(y):
        looked_up.append(y)
        return head[y]

    with torch.no_grad():
        got = streamed_head_cross_entropy(hidden, labels, _chunks(head, 9), rows)
    want = F.cross_entropy(hidden.double() @ head.double().t(), labels, reduction="sum", ignore_index=-100)
    assert abs(float(got) - float(want)) <= 1e-5 * float(want)
    assert not looked_up, "no gradient wanted: the label rows are never read"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streamed_matches_the_oracle_on_a_gpu_at_llama_width(dtype, parity):
    hidden, head, labels = _data(2048, 4096, 32000, "cuda")
    oracle = _oracle(hidden, head, labels, dtype)
    ref = _reference(hidden, head, labels, dtype)
    got = _streamed(hidden, head, labels, dtype, 4096)
    for name in oracle:
        parity(f"streamed-gpu/{dtype}/{name}", got[name], ref[name], oracle[name])


@pytest.mark.gpu
def test_the_host_head_streams_a_few_chunks_at_a_time_and_records_in_a_graph(monkeypatch):
    """HeadStage's stream: the loss equals the one on the same chunks from device memory, bit for bit; at most
    AHEAD chunks (plus the loss state) are on the device during the loss and none after it; a prefetch by the
    forward is consumed by the next loss; a CUDA graph records the side-stream copies and replays them."""
    from lorafuse.accel.host_tables import HeadStage, device_alias

    monkeypatch.setattr(HeadStage, "CHUNK_BYTES", 1000 * 256 * 2)  # 1000-row chunks of a 256-wide head
    hidden, head, labels = _data(64, 256, 9500, "cuda")
    hidden, head = hidden.bfloat16(), head.bfloat16()
    host = torch.empty(head.shape, dtype=head.dtype, pin_memory=True)
    host.copy_(head)
    stage = HeadStage(host, hidden.device, alias=device_alias(host, hidden.device))
    assert stage.chunk_rows == 1000 and stage.streams(64) and not stage.streams(10**6)

    def loss_of(source, rows):
        h = hidden.detach().requires_grad_()
        loss = streamed_head_cross_entropy(h, labels, source, rows)
        loss.backward()
        return loss.detach(), h.grad

    want_loss, want_dh = loss_of(_chunks(head, 1000), lambda y: head[y])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stage.prefetch(64)
    assert len(stage.queue) == HeadStage.AHEAD
    got_loss, got_dh = loss_of(stage.chunks(), stage.target_rows)
    torch.cuda.synchronize()
    assert torch.equal(got_loss, want_loss) and torch.equal(got_dh, want_dh)
    assert not stage.queue
    chunk = 1000 * 256 * 2
    state = 64 * 256 * (4 + 2 + 2) + 64 * 1000 * (4 + 2) + (1 << 16)  # o, dh, one product; a logits block
    peak = torch.cuda.max_memory_allocated() - base
    assert HeadStage.AHEAD * chunk <= peak <= HeadStage.AHEAD * chunk + state + 64 * 256 * 2
    del got_dh
    assert torch.cuda.memory_allocated() - base <= 64 * 256 * 2  # only the caller's gradient was left

    static_labels = labels.clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss_of(stage.chunks(), stage.target_rows)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = streamed_head_cross_entropy(hidden, static_labels, stage.chunks(), stage.target_rows)
    new = torch.randint(0, 9500, labels.shape, device="cuda")
    static_labels.copy_(new)
    graph.replay()
    with torch.no_grad():
        expect = streamed_head_cross_entropy(hidden, new, _chunks(head, 1000), lambda y: head[y])
    assert torch.equal(captured, expect)

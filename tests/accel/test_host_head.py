"""train.head_on_host: the frozen output head in pinned host memory between losses, staged for each one."""

from __future__ import annotations

import copy

import pytest
import torch
from workloads import lean_workload

from lorafuse import accel
from lorafuse.accel import host_tables as host_embedding
from lorafuse.accel.host_tables import head_to_device, head_to_host, host_head_blocker, simple_head
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.options import Options
from lorafuse.plan.memory import estimate, weight_bytes
from lorafuse.plan.shapes import builtin_shape
from lorafuse.plan.workload import Workload
from lorafuse.training.loss import lm_loss_sum


def _model(**kw):
    model = build_tiny_model("llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=4, **kw)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    return model


def test_blockers_give_one_line_reasons():
    assert host_head_blocker(_model()) == "the model is not on a CUDA device"
    assert "tied to the input embedding" in host_head_blocker(_model(tie_word_embeddings=True))
    trained = _model()
    trained.get_output_embeddings().weight.requires_grad_(True)
    assert "trained" in host_head_blocker(trained)
    capped = _model()
    capped.config.final_logit_softcapping = 30.0  # logits are not hidden @ W^T: the loss needs the model's own
    assert "model's own logits" in host_head_blocker(capped)


def test_prepare_model_says_why_the_head_stays():
    model, notes = _model(), []
    weight = model.get_output_embeddings().weight
    accel.prepare(model, Options(fast_path="off", gradient_checkpointing=False, head_on_host=True), note=notes.append)
    assert notes[-1] == "output head stays on the device: the model is not on a CUDA device"
    assert model.get_output_embeddings().weight is weight and accel.accel_state(model).head_stage is None


class _CountingStage:
    def __init__(self):
        self.armed, self.prefetches = False, 0

    def prefetch(self, rows=None):
        self.prefetches += 1


def _hooked(model, stage):
    model.base_model.register_forward_pre_hook(host_embedding._arm(stage), with_kwargs=True)
    layers = host_embedding.decoder_layers(model)
    layers[len(layers) // 2].register_forward_pre_hook(host_embedding._fire(stage), with_kwargs=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_copy_is_staged_once_per_training_forward_never_in_the_recompute(checkpointing):
    """The prefetch is armed by the stack's forward and fired by the middle layer: once per training forward,
    not by the checkpoint's recompute inside the backward (that copy would sit on the backward's peak), and not
    by a forward under no_grad (generation, evaluation) or in eval mode."""
    model = _model()
    accel.prepare(model, Options(fast_path="off", gradient_checkpointing=checkpointing), note=lambda s: None)
    stage = _CountingStage()
    _hooked(model, stage)
    ids = torch.randint(0, 96, (2, 9))
    model.train()
    for expected in (1, 2):
        loss = lm_loss_sum(model, {"input_ids": ids, "labels": ids}, simple_head(model))
        assert stage.prefetches == expected
        loss.backward()
        assert stage.prefetches == expected, "the recompute in backward staged the head again"
        host_embedding._fire(stage)(None, ())  # a recompute that runs module hooks (transformers 4.x checkpointed
        assert stage.prefetches == expected  # __call__; 5.x checkpoints forward, inside the hooks) stages nothing
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)
    assert stage.prefetches == 2


@pytest.mark.parametrize(
    "shape,batch,seq,moved", [("llama2-7b", 4, 512, True), ("llama3-8b", 2, 2048, True), ("llama3.2-1b", 4, 512, False)]
)
def test_planner_takes_the_head_off_the_backward_only(shape, batch, seq, moved):
    """The head's bytes leave the static weights and come back while it is staged (the loss, and the forward of
    the layers after the middle one), so the prediction drops by at most the head when the backward is the peak
    phase; a tied head never moves."""
    s = builtin_shape(shape)
    on_gpu, on_host = lean_workload(shape, batch, seq), lean_workload(shape, batch, seq, head_on_host=True)
    head = 2 * s.vocab_size * s.hidden_size
    saved = weight_bytes(on_gpu)["weights_16bit"] - weight_bytes(on_host)["weights_16bit"]
    assert saved == (head if moved else 0)
    est_gpu, est_host = estimate(on_gpu), estimate(on_host)
    if moved:
        assert est_gpu.phase == "backward" and est_host.components["head_staged"] == (
            head if est_host.phase in ("loss", "forward") else 0
        )
        backward = sum(v for k, v in est_gpu.components.items() if k not in ("allocator_slack", "cuda_context"))
        assert est_host.peak_alloc < backward
        assert est_host.peak_alloc >= backward - head  # the head leaves the backward, nothing more
    else:
        assert est_host.peak_alloc == est_gpu.peak_alloc
    full = Workload(s, method="full")
    assert weight_bytes(full) == weight_bytes(full.with_(head_on_host=True))  # full FT trains the head


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_a_staged_head_trains_like_the_device_head_and_leaves_the_backward(fused):
    """Same loss and LoRA gradients, bit for bit (the same GEMMs read the same bytes from a device copy); the
    head's bytes leave the allocator, come back staged during the loss and are gone again before the backward;
    generation reads the host table in place; a CUDA graph records prefetch, copy and fused loss; the head goes
    back intact."""
    torch.manual_seed(0)
    base = _model().to("cuda", torch.bfloat16)
    accel.prepare(base, Options(fast_path="off", gradient_checkpointing=True), note=lambda s: None)
    ids = torch.randint(0, 96, (2, 33), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    base.train()

    def run(model):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = lm_loss_sum(model, batch, simple_head(model), fused)
        after_loss, peak = torch.cuda.memory_allocated() - start, torch.cuda.max_memory_allocated() - start
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, after_loss, peak

    on_device = copy.deepcopy(base)
    want_loss, want, device_after_loss, device_peak = run(on_device)
    head = base.get_output_embeddings()
    param, nbytes = head.weight, head.weight.numel() * head.weight.element_size()
    before = torch.cuda.memory_allocated()
    stage, hooks, reason = head_to_host(base)
    accel.accel_state(base).head_stage = stage  # what accel.prepare does with head_on_host: the loss reads it there
    assert reason == "" and stage.host.nbytes == nbytes and head.weight is param and head.weight.is_cuda
    assert torch.cuda.memory_allocated() <= before - nbytes
    got_loss, got, host_after_loss, host_peak = run(base)
    assert torch.equal(got_loss, want_loss)
    for name, grad in got.items():
        assert torch.equal(grad, want[name]), name
    assert stage.pending is None
    assert host_after_loss == device_after_loss  # the staged copy is gone when the backward starts
    assert host_peak >= nbytes  # and it was there for the loss
    with torch.no_grad():
        logits = base(input_ids=ids).logits
        torch.testing.assert_close(logits, on_device(input_ids=ids).logits, rtol=0, atol=0)
    if fused:  # the chunked reference loss selects rows on the host: no capture
        from lorafuse.kernels.cross_entropy import fixed_shape

        static_ids = ids.clone()
        static = {"input_ids": static_ids, "labels": static_ids}
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), fixed_shape():
            lm_loss_sum(base, static, simple_head(base), True)  # warm-up off the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            captured = lm_loss_sum(base, static, simple_head(base), True)
        static_ids.copy_(torch.randint(0, 96, (2, 33), device="cuda"))
        graph.replay()
        with fixed_shape():
            expect = lm_loss_sum(on_device, static, simple_head(on_device), True)
        assert torch.equal(captured.detach(), expect.detach())
    head_to_device(base, stage, hooks)
    assert head.weight.data_ptr() != stage.host.data_ptr()
    assert torch.equal(head.weight, on_device.get_output_embeddings().weight)


@pytest.mark.parametrize("batch,seq", [(4, 512), (1, 4096), (8, 2048)])
def test_planner_and_stage_agree_on_streaming_the_head(batch, seq):
    """The planner streams the head exactly where HeadStage does (its fp32 state smaller than the head), and then
    counts AHEAD of the stage's chunks staged, not the head; 8 x 2048 tokens of a 4096-wide model would need more
    state than the 0.24 GiB head, so there the whole head is staged."""
    from lorafuse.accel.host_tables import HeadStage
    from lorafuse.plan.placement import streamed_head

    s = builtin_shape("llama2-7b")
    w = lean_workload("llama2-7b", batch, seq, head_on_host=True)
    table = torch.empty(s.vocab_size, s.hidden_size, dtype=torch.bfloat16, device="meta")
    stage = HeadStage(table, torch.device("cpu"), alias=table)
    streams = stage.streams(batch * seq)
    assert (streamed_head(w) is not None) == streams == (batch * seq * s.hidden_size * 4 < table.nbytes)
    est = estimate(w)
    if streams:
        staged = HeadStage.AHEAD * stage.chunk_rows * s.hidden_size * 2
        assert streamed_head(w)[0] == staged < table.nbytes
        assert est.components["head_staged"] in (0, staged)
    else:
        assert est.components["head_staged"] in (0, table.nbytes)

"""train.embeddings_on_host: the frozen input embedding in pinned host memory, read by the GPU in place (and both host
table keys, this one and train.head_on_host, as the config reads them)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafuse import accel
from lorafuse.accel.host_tables import embeddings_to_device, embeddings_to_host, host_embedding_blocker
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.options import Options
from lorafuse.plan.memory import estimate, weight_bytes
from lorafuse.plan.shapes import builtin_shape
from lorafuse.plan.workload import Workload


def _model(**kw):
    model = build_tiny_model("llama", vocab_size=96, hidden_size=64, intermediate_size=96, **kw)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    return model


def test_blockers_give_one_line_reasons():
    assert host_embedding_blocker(_model()) == "the model is not on a CUDA device"
    assert "tied to the output head" in host_embedding_blocker(_model(tie_word_embeddings=True))
    trained = _model()
    trained.get_input_embeddings().weight.requires_grad_(True)
    assert "trained" in host_embedding_blocker(trained)


def test_prepare_model_says_why_the_table_stays(capsys):
    model, notes = _model(), []
    weight = model.get_input_embeddings().weight
    state = accel.prepare(
        model, Options(fast_path="off", gradient_checkpointing=False, embeddings_on_host=True), note=notes.append
    )
    assert notes[-1] == "input embedding stays on the device: the model is not on a CUDA device"
    assert model.get_input_embeddings().weight is weight and state.host_embedding is None
    assert embeddings_to_host(model) == (None, "the model is not on a CUDA device")


@pytest.mark.parametrize("shape,moved", [("llama2-7b", True), ("llama3-8b", True), ("llama3.2-1b", False)])
def test_planner_takes_the_table_off_the_gpu_unless_tied(shape, moved):
    s = builtin_shape(shape)
    on_gpu, on_host = Workload(s), Workload(s, embeddings_on_host=True)
    saved = weight_bytes(on_gpu)["weights_16bit"] - weight_bytes(on_host)["weights_16bit"]
    assert saved == (2 * s.vocab_size * s.hidden_size if moved else 0)
    assert estimate(on_gpu).peak_alloc - estimate(on_host).peak_alloc == saved
    full = Workload(s, method="full")
    assert weight_bytes(full) == weight_bytes(full.with_(embeddings_on_host=True))  # full FT trains the table


@pytest.mark.parametrize("key", ["embeddings_on_host", "head_on_host"])
def test_host_table_keys_default_off_and_read_from_yaml(tmp_path, key):
    from lorafuse.config import load_config

    assert getattr(load_config(None).train, key) is False
    (tmp_path / "c.yaml").write_text(
        f'model: {{path: "builtin:tiny-llama"}}\ndata: {{path: "builtin:demo"}}\ntrain:\n  {key}: true\n'
    )
    assert getattr(load_config(str(tmp_path / "c.yaml")).train, key) is True
    assert getattr(load_config(None, [f"train.{key}=on"]).train, key) is True


@pytest.mark.gpu
def test_alias_trains_like_the_device_table_and_frees_its_memory():
    """Same logits and LoRA gradients (the same kernel reads the same bytes, only over PCIe), the table's bytes
    off the allocator, a CUDA graph can record the lookup, and the table goes back intact."""
    torch.manual_seed(0)
    base = _model().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 96, (2, 33), device="cuda")

    def grads(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    on_device = copy.deepcopy(base)
    want_logits, want = grads(on_device)
    table = base.get_input_embeddings().weight
    param, before = table, torch.cuda.memory_allocated()
    host, reason = embeddings_to_host(base)
    moved = host.nbytes
    assert reason == "" and moved == table.numel() * table.element_size()
    assert torch.cuda.memory_allocated() <= before - moved  # the alias is not the allocator's memory
    emb = base.get_input_embeddings()
    assert emb.weight is param and emb.weight.is_cuda and host.is_pinned()
    torch.testing.assert_close(emb.weight, on_device.get_input_embeddings().weight, rtol=0, atol=0)
    got_logits, got = grads(base)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=0, atol=0)
    static = ids[:1].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        looked_up = emb(static)
    static.copy_(ids[1:])
    graph.replay()
    torch.testing.assert_close(looked_up, on_device.get_input_embeddings()(ids[1:]), rtol=0, atol=0)
    state = base.state_dict()["model.embed_tokens.weight"]
    torch.testing.assert_close(state.cpu(), on_device.get_input_embeddings().weight.cpu(), rtol=0, atol=0)
    embeddings_to_device(base, host)
    assert emb.weight.data_ptr() != host.data_ptr()
    torch.testing.assert_close(emb.weight, on_device.get_input_embeddings().weight, rtol=0, atol=0)


def test_a_platform_without_mapped_pinned_memory_keeps_the_table(monkeypatch):
    """Where pinned memory cannot be allocated or mapped (here: no CUDA at all), the run goes on with the table
    on the device and says why, instead of failing before training."""
    from lorafuse.accel import host_tables as host_embedding

    if torch.cuda.is_available():
        pytest.skip("needs a machine where pinned memory fails (no CUDA)")
    model = _model()
    weight = model.get_input_embeddings().weight.detach().clone()
    monkeypatch.setattr(host_embedding, "host_embedding_blocker", lambda m: "")
    host, reason = embeddings_to_host(model)
    assert host is None and reason.startswith("pinned host memory could not be mapped for the GPU here")
    assert torch.equal(model.get_input_embeddings().weight, weight)

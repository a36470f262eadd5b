"""CUDA graphs for forward + backward (lorafuse/training/graphs.py): when they apply, and that a replay trains
exactly as the eager step does (GPU)."""

from __future__ import annotations

import math

import pytest
import torch

import lorafuse
from lorafuse.accel import AccelState
from lorafuse.accel.fast_path import apply_fast_path
from lorafuse.config import load_config
from lorafuse.model_state import model_state
from lorafuse.options import Options
from lorafuse.training.graphs import GraphedMicroStep, graph_blocker


def _lora_model(tiny_model_dir, dropout=0.0, quant="none", device="cpu", dtype="float32"):
    model, _ = lorafuse.load_model(str(tiny_model_dir), quant=quant, compute_dtype=dtype, device=device)
    lorafuse.apply_lora(model, r=4, alpha=8, dropout=dropout, targets="all-linear")
    return model


def _with_fast_path(model):
    """The model as accel.prepare leaves it with the fast path on (the reference ops: this is a CPU test)."""
    fast, reason = apply_fast_path(model, use_reference=True)
    assert fast is not None, reason
    params = [p for p in model.parameters() if p.requires_grad]
    model_state(model).accel = AccelState(Options(gradient_checkpointing=False), params, fast=fast)
    return fast


def test_graph_blocker_gives_the_reason(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    assert "CUDA device" in graph_blocker(model, torch.device("cpu"))
    assert "fast path" in graph_blocker(model, torch.device("cuda"))
    _with_fast_path(model)
    assert graph_blocker(model, torch.device("cuda")) is None
    assert "single-process" in graph_blocker(model, torch.device("cuda"), world_size=2)
    dropped = _lora_model(tiny_model_dir, dropout=0.1)
    _with_fast_path(dropped).seeds.clear()  # LoRA dropout in a module the fast path does not seed
    reason = graph_blocker(dropped, torch.device("cuda"))
    assert "dropout 0.1" in reason and "lora.dropout: 0" in reason


def test_every_objectives_step_gets_a_graphed_step(tiny_model_dir):
    """SFT's step and a preference objective's (a CPU can build them: nothing is captured before the first CUDA
    micro-batch); train.cuda_graphs=off gives none, said in no line."""
    from lorafuse.accel import accel_state
    from lorafuse.training import graphs
    from lorafuse.training.objectives import DPOObjective, ORPOObjective, SFTObjective
    from lorafuse.training.runtime import Precision

    model, notes = _lora_model(tiny_model_dir), []
    _with_fast_path(model)
    cuda, state = Precision(torch.device("cuda"), torch.bfloat16), accel_state(model)
    for objective in (None, SFTObjective(), DPOObjective(), ORPOObjective()):
        assert isinstance(graphs.build(model, state, cuda, 1, "auto", objective, notes.append), GraphedMicroStep)
    assert graphs.build(model, state, cuda, 1, "off", DPOObjective(), notes.append) is None and notes == []


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_preference_objectives_graphed_loss_is_its_loss_and_metrics(tiny_model_dir, objective):
    """What the graph records for DPO / ORPO: one vector, the loss sum then the metric sums in the objective's
    order, equal to its eager loss_sum (the fixed-shape log-prob pass the capture takes, here on a CPU)."""
    from lorafuse.accel.host_tables import simple_head
    from lorafuse.kernels.cross_entropy import fixed_shape
    from lorafuse.training import graphs
    from lorafuse.training.objectives import DPOObjective, ObjectiveContext, ORPOObjective
    from lorafuse.training.runtime import Precision

    model = _lora_model(tiny_model_dir)
    for name, p in model.named_parameters():  # an adapter that is not zero: the policy differs from the reference
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    obj = DPOObjective(beta=0.2) if objective == "dpo" else ORPOObjective(lam=0.3)
    ctx = ObjectiveContext(Precision(torch.device("cpu"), torch.float32), simple_head(model), False)
    (batch,) = _pair_batches(512, 1, device="cpu")
    want_loss, want_metrics = obj.loss_sum(model, batch, ctx)
    with fixed_shape():
        loss_fn = graphs.objective_loss_fn(model, obj, ctx.precision, ctx.head, ctx.fused)
        got = loss_fn(obj.inputs(model, batch, ctx.precision))
    want = torch.stack([want_loss, *(want_metrics[n] for n in obj.metric_names)])
    assert got.shape == (1 + len(obj.metric_names),) and got.requires_grad
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    assert want_metrics["rewards/margin"].abs() > 1e-3, "the adapter must separate chosen from rejected"


def test_yaml_off_and_on_are_the_switch_words():
    """A bare `off` in YAML is the boolean false: the config takes it as "off", not as an error."""
    cfg = load_config(None, ["train.cuda_graphs=off", "train.fast_path=off"])
    assert (cfg.train.cuda_graphs, cfg.train.fast_path) == ("off", "off")
    assert load_config(None, ["train.fast_path=on"]).train.fast_path == "on"


def _batches(vocab, n, shape=(2, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, shape, generator=g).cuda()
        labels = ids.clone()
        labels[:, :5] = -100  # a prompt: the fixed-shape loss must weigh these rows 0
        out.append({"input_ids": ids, "labels": labels})
    return out


def _pair_batches(vocab, n, pairs=2, width=32, seed=0, device="cuda"):
    """`n` preference micro-batches of `pairs` pairs: the chosen rows, then the rejected ones, each a shared prompt
    (labels -100) and its own response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(4, vocab, (pairs, 12), generator=g)
        responses = torch.randint(4, vocab, (2 * pairs, width - 12), generator=g)
        ids = torch.cat([prompt.repeat(2, 1), responses], dim=1)
        labels = ids.clone()
        labels[:, :12] = -100
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        out.append({**{k: v.to(device) for k, v in batch.items()}, "num_pairs": pairs, "right_padded": True})
    return out


def _train(model, batches, graphed: bool, accum: int = 2, checkpointing=True):
    """Optimizer steps of `accum` micro-batches each; returns per-micro-batch losses and the final LoRA tensors."""
    from lorafuse import accel
    from lorafuse.accel.host_tables import simple_head
    from lorafuse.options import Options
    from lorafuse.training.loss import lm_loss_sum
    from lorafuse.training.runtime import Precision

    params = accel.prepare(
        model, Options(fast_path="on", gradient_checkpointing=checkpointing), note=lambda s: None
    ).params
    for p in params:  # B starts at zero (LoRA's init); a nonzero B makes every gradient, and each step, count
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    initial = [p.detach().clone() for p in params]
    head = simple_head(model)
    precision = Precision(torch.device("cuda"), torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=1e-2)
    notes = []
    step = GraphedMicroStep(
        model,
        params,
        lambda b: lm_loss_sum(model, b, head, True),
        precision.backward,
        torch.bfloat16,
        note=notes.append,
    )
    losses = []
    model.train()
    for i in range(0, len(batches), accum):
        window = batches[i : i + accum]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        for b in window:
            losses.append(float(step(b, 1.0 / n) if graphed else step.eager(b, 1.0 / n)))
        opt.step()
        opt.zero_grad(set_to_none=not graphed)
    moved = all(not torch.equal(p, q) for p, q in zip(params, initial))
    return losses, [p.detach().clone() for p in params], step, notes, moved


@pytest.mark.gpu
@pytest.mark.parametrize(
    "quant,dropout,checkpointing",
    [("nf4", 0.0, True), ("none", 0.0, True), ("nf4", 0.1, True), ("nf4", 0.1, "offload")],
)
def test_replayed_steps_train_exactly_as_eager_steps(tiny_model_dir, quant, dropout, checkpointing):
    """10 micro-batches, accumulation 2: two eager warm-ups, a capture, then replays. Losses and the trained
    LoRA tensors equal those of the same run done eagerly, bit for bit (the same kernels run in the same order;
    with dropout, the replayed seed increment draws the masks the eager forwards draw; with activation offload,
    the replay copies through the same pinned buffers the capture recorded)."""
    batches = _batches(512, 10)
    torch.manual_seed(0)
    eager_losses, eager_params, _, _, eager_moved = _train(
        _lora_model(tiny_model_dir, dropout, quant=quant, device="cuda", dtype="bfloat16"),
        batches,
        graphed=False,
        checkpointing=checkpointing,
    )
    torch.manual_seed(0)
    graph_losses, graph_params, step, notes, graph_moved = _train(
        _lora_model(tiny_model_dir, dropout, quant=quant, device="cuda", dtype="bfloat16"),
        batches,
        graphed=True,
        checkpointing=checkpointing,
    )
    assert step.disabled is None, notes
    assert step.replays == 8  # micro-batches 3..10: 1 and 2 warm up eagerly, 3 is captured, then all replay
    assert graph_losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(graph_params, eager_params))
    assert eager_moved and graph_moved, "every LoRA tensor was updated by the steps"


@pytest.mark.gpu
def test_another_shape_runs_eagerly_and_still_trains(tiny_model_dir):
    model = _lora_model(tiny_model_dir, quant="nf4", device="cuda", dtype="bfloat16")
    batches = _batches(512, 6) + _batches(512, 2, shape=(3, 24), seed=1)
    losses, _, step, notes, moved = _train(model, batches, graphed=True)
    assert step.disabled is None and step.replays == 4, notes
    assert moved and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.gpu
def test_a_failed_capture_leaves_the_devices_random_draws_working(tiny_model_dir):
    """A loss that synchronises with the host cannot be captured: the step runs eagerly from then on, and the CUDA
    generator the capture registered draws again (a failed capture would otherwise leave it in capture mode, where
    every draw raises), continuing from where it stood before the capture."""
    model = _lora_model(tiny_model_dir, quant="nf4", device="cuda", dtype="bfloat16")
    from lorafuse import accel
    from lorafuse.accel.host_tables import simple_head
    from lorafuse.options import Options
    from lorafuse.training.loss import lm_loss_sum
    from lorafuse.training.runtime import Precision

    params = accel.prepare(model, Options(fast_path="on"), note=lambda s: None).params
    head = simple_head(model)

    def syncing_loss(batch):
        loss = lm_loss_sum(model, batch, head, True)
        float(loss)  # a host synchronisation: not allowed while the stream is captured
        return loss

    notes = []
    step = GraphedMicroStep(
        model,
        params,
        syncing_loss,
        Precision(torch.device("cuda"), torch.bfloat16).backward,
        torch.bfloat16,
        note=notes.append,
    )
    for batch in _batches(512, 4):
        torch.manual_seed(7)
        expected = torch.randn(8, device="cuda")
        torch.manual_seed(7)
        assert torch.isfinite(step(batch, 1e-3))
        assert torch.equal(torch.randn(8, device="cuda"), expected)  # draws work, from the pre-capture state
    assert step.disabled is not None and any("CUDA graphs off" in n for n in notes)


class _Recorder(GraphedMicroStep):
    """GraphedMicroStep with capture and eager replaced by records: the capture policy alone, on a CPU."""

    def __init__(self, **kw):
        super().__init__(model=None, params=[], loss_fn=None, backward=None, dtype=torch.float32, **kw)
        self.calls = []

    def eager(self, batch, inv_n, fixed=True):
        self.calls.append(("eager", tuple(batch["input_ids"].shape), fixed))
        return torch.zeros(())

    def _capture(self, batch, key):
        self.calls.append(("capture", tuple(batch["input_ids"].shape)))
        return None  # as a failed capture: the caller runs the batch eagerly; the policy is what is tested


def _ids(*shape, mask=False):
    batch = {"input_ids": torch.zeros(shape, dtype=torch.long)}
    if mask:
        batch["attention_mask"] = torch.ones(shape, dtype=torch.long)
    return batch


def test_each_shape_is_captured_after_its_warmup():
    rec = _Recorder(warmup=2)
    for shape in [(4, 64), (4, 128), (4, 64), (4, 64), (4, 128)]:
        rec(_ids(*shape), 1.0)
    assert rec.calls == [
        ("eager", (4, 64), True),
        ("eager", (4, 128), True),
        ("eager", (4, 64), True),
        ("capture", (4, 64)),
        ("eager", (4, 64), False),
        ("eager", (4, 128), True),
    ]


def test_shapes_past_the_limit_run_eagerly_with_one_note():
    notes = []
    rec = _Recorder(warmup=0, note=notes.append)
    rec.graphs = {i: None for i in range(rec.MAX_GRAPHS)}  # as if MAX_GRAPHS shapes were captured already
    rec(_ids(4, 32), 1.0)
    rec(_ids(4, 33), 1.0)
    assert rec.calls == [("eager", (4, 32), False), ("eager", (4, 33), False)]
    assert len(notes) == 1 and f"{rec.MAX_GRAPHS} shapes" in notes[0]


def test_shapes_that_never_repeat_get_a_note():
    notes = []
    rec = _Recorder(warmup=2, note=notes.append)
    for i in range(60):
        rec(_ids(4, 32 + i), 1.0)  # 60 distinct lengths: nothing to capture
    assert not [c for c in rec.calls if c[0] == "capture"]
    assert len(notes) == 1 and "data.packing" in notes[0]


def test_padded_mask_becomes_the_4d_mask_sdpa_takes():
    rec = _Recorder()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = rec.prepare({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})["attention_mask"]
    assert out.shape == (2, 1, 4, 4) and out.dtype == torch.bool
    want = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    assert torch.equal(out[:, 0], want)
    assert out[:, 0].any(-1).all(), "every query row, pads included, attends to at least one real token"
    packed = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "position_ids": torch.zeros(2, 4),
        "attention_mask": mask,
    }
    assert rec.prepare(packed) is packed


def test_dropout_through_the_fast_path_seeds_allows_graphs(tiny_model_dir):
    model = _lora_model(tiny_model_dir, dropout=0.1)
    _with_fast_path(model)
    assert graph_blocker(model, torch.device("cuda")) is None


def test_loop_dropout_base_depends_on_seed_rank_and_step():
    from lorafuse.training.graphs import dropout_seed_base as base

    assert base(0, 0, 4, 5) == base(0, 0, 4, 5)  # a resumed run recomputes the same value
    assert base(0, 0, 4, 5) - base(0, 0, 4, 4) == 256  # room for every micro-batch of a step (each forward adds 1)
    assert len({base(0, 0, 4, 0), base(1, 0, 4, 0), base(0, 1, 4, 0)}) == 3
    assert base(0, 0, 300, 1) - base(0, 0, 300, 0) == 512


@pytest.mark.gpu
def test_two_shapes_share_one_pool_and_train_exactly_as_eager(tiny_model_dir):
    """Padded-length buckets: two shapes in turn, each captured after its warm-up, both graphs in one memory
    pool, replayed in any order: losses and LoRA tensors equal the eager run's, bit for bit."""
    a, b = _batches(512, 6, shape=(2, 32)), _batches(512, 6, shape=(2, 64), seed=1)
    batches = [x for pair in zip(a, b) for x in pair]
    torch.manual_seed(0)
    eager_losses, eager_params, _, _, _ = _train(
        _lora_model(tiny_model_dir, quant="nf4", device="cuda", dtype="bfloat16"), batches, graphed=False
    )
    torch.manual_seed(0)
    graph_losses, graph_params, step, notes, moved = _train(
        _lora_model(tiny_model_dir, quant="nf4", device="cuda", dtype="bfloat16"), batches, graphed=True
    )
    assert step.disabled is None and len(step.graphs) == 2 and step.replays == 8, notes
    assert graph_losses == eager_losses and moved
    assert all(torch.equal(x, y) for x, y in zip(graph_params, eager_params))


def _train_dpo(model, batches, graphed: bool, reference: str, accum: int = 2, shared: str = "auto"):
    """DPO optimizer steps of `accum` pair micro-batches through the graphed step (or its eager path): the
    per-micro-batch output vectors and the final LoRA tensors."""
    from lorafuse import accel
    from lorafuse.training import graphs
    from lorafuse.training.objectives import DPOObjective
    from lorafuse.training.runtime import Precision

    state = accel.prepare(model, Options(fast_path="on", gradient_checkpointing=True), note=lambda s: None)
    precision = Precision(torch.device("cuda"), torch.bfloat16)
    notes = []
    objective = DPOObjective(beta=0.1, reference=reference, shared_prompt=shared)
    step = graphs.build(model, state, precision, 1, "auto", objective, notes.append)
    opt = torch.optim.AdamW(state.params, lr=1e-2)
    outs = []
    model.train()
    for i in range(0, len(batches), accum):
        window = batches[i : i + accum]
        pairs = sum(b["num_pairs"] for b in window)
        for b in window:
            inputs = objective.inputs(model, b, precision)
            outs.append((step(inputs, 1.0 / pairs) if graphed else step.eager(inputs, 1.0 / pairs)).cpu())
        opt.step()
        opt.zero_grad(set_to_none=False)
    return outs, [p.detach().clone() for p in state.params], step, notes


@pytest.mark.gpu
@pytest.mark.parametrize("shared", ["auto", "off"], ids=["shared-prompt", "row-per-answer"])
@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_dpo_replayed_steps_train_exactly_as_eager_steps(tiny_model_dir, reference, shared):
    """DPO's micro-step captured whole (the reference pass with the adapter off, the policy pass, the pair loss
    and its metrics): 8 micro-batches of 2 pairs, accumulation 2; outputs and trained LoRA tensors equal the eager
    steps' bit for bit, and the first step's loss is ln 2 per pair (a fresh adapter is its own reference). Both
    layouts: each pair's prompt once (its attention as two causal attentions), and a row per answer."""
    batches = _pair_batches(512, 8)
    if reference == "precomputed":  # stand-in reference values: the step must read them from its static input
        g = torch.Generator().manual_seed(3)
        for b in batches:
            b["ref_logps"] = (-200 + 10 * torch.rand(b["input_ids"].shape[0], generator=g)).cuda()
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = _lora_model(tiny_model_dir, quant="nf4", device="cuda", dtype="bfloat16")
        runs[graphed] = _train_dpo(model, batches, graphed, reference, shared=shared)
    (eager_outs, eager_params, _, _), (graph_outs, graph_params, step, notes) = runs[False], runs[True]
    assert step.disabled is None and step.replays == 6 and len(step.graphs) == 1, notes
    assert all(torch.equal(a, b) for a, b in zip(graph_outs, eager_outs))
    assert all(torch.equal(a, b) for a, b in zip(graph_params, eager_params))
    if reference == "live":
        assert math.isclose(float(eager_outs[0][0]), 2 * math.log(2), rel_tol=1e-6)
    assert len({round(float(o[0]), 6) for o in graph_outs}) > 4, "the replays compute new losses as the adapter trains"


@pytest.mark.gpu
def test_the_capture_reuses_the_warm_up_cublas_workspaces(tiny_model_dir):
    """Warm-up and capture run on one stream, so the captured GEMMs use the cuBLAS workspaces (one per handle and
    stream) the warm-up made: the capture keeps only the graph's outputs and static inputs alive. Captured on a
    stream of its own after the same warm-up, it holds a new workspace per handle for as long as the graph lives."""
    from lorafuse import accel
    from lorafuse.accel.host_tables import simple_head
    from lorafuse.options import Options
    from lorafuse.training.loss import lm_loss_sum
    from lorafuse.training.runtime import Precision

    grown = []
    for own_stream in (False, True):
        torch.manual_seed(0)
        model = _lora_model(tiny_model_dir, 0.0, quant="nf4", device="cuda", dtype="bfloat16")
        params = accel.prepare(model, Options(fast_path="on", gradient_checkpointing=True), note=lambda s: None).params
        head = simple_head(model)
        step = GraphedMicroStep(
            model,
            params,
            lambda b, model=model: lm_loss_sum(model, b, head, True),
            Precision(torch.device("cuda"), torch.bfloat16).backward,
            torch.bfloat16,
            note=lambda s: None,
        )
        model.train()
        batches = _batches(512, 3)
        for b in batches[:2]:
            step(b, 1e-3)  # the warm-ups
        if own_stream:
            step.stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        step(batches[2], 1e-3)  # capture, then replay
        torch.cuda.synchronize()
        assert step.disabled is None and step.replays == 1
        grown.append(torch.cuda.memory_allocated() - before)
        del step, model, params
        torch.cuda.empty_cache()
    shared, separate = grown
    assert shared < 1 << 20, f"the capture kept {shared / 2**20:.1f} MiB"
    assert separate > shared + (4 << 20), "a capture on its own stream made workspaces of its own"


@pytest.mark.gpu
def test_an_evaluation_on_the_graphs_stream_leaves_no_workspace_behind(tiny_model_dir):
    """A no-grad pass between graphed steps (the loop's evaluation) run through `on_stream` uses the workspaces the
    warm-up made for the graphs' stream; the same pass on any other stream leaves a cuBLAS workspace allocated
    (checked on a fresh stream: the default one may hold a workspace from earlier tests in this process, and so may
    any pooled stream of default priority, since torch hands those out round-robin from 32; nothing in lorafuse or
    its tests takes a high-priority stream, so the first one is fresh)."""
    from lorafuse import accel
    from lorafuse.accel.host_tables import simple_head
    from lorafuse.options import Options
    from lorafuse.training.loss import lm_loss_sum
    from lorafuse.training.runtime import Precision

    torch.manual_seed(0)
    model = _lora_model(tiny_model_dir, 0.0, quant="nf4", device="cuda", dtype="bfloat16")
    params = accel.prepare(model, Options(fast_path="on", gradient_checkpointing=True), note=lambda s: None).params
    head = simple_head(model)
    step = GraphedMicroStep(
        model,
        params,
        lambda b: lm_loss_sum(model, b, head, True),
        Precision(torch.device("cuda"), torch.bfloat16).backward,
        torch.bfloat16,
        note=lambda s: None,
    )
    model.train()
    batches = _batches(512, 4)
    for b in batches[:3]:
        step(b, 1e-3)  # two warm-ups and the capture
    assert step.replays == 1

    def evaluation():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = float(lm_loss_sum(model, batches[3], head, True))
        model.train()
        return loss

    grown = []
    for on_stream in (True, False):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with step.on_stream() if on_stream else torch.cuda.stream(torch.cuda.Stream(priority=-1)):
            loss = evaluation()
        torch.cuda.synchronize()
        grown.append(torch.cuda.memory_allocated() - before)
        assert math.isfinite(loss)
    assert grown[0] < 1 << 20, f"the evaluation on the graphs' stream kept {grown[0] / 2**20:.1f} MiB"
    assert grown[1] > grown[0] + (4 << 20), "on another stream it made a workspace of its own"

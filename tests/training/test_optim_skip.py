"""The optimizers' device-side skip flag (`step(apply=flag)`, lorafuse.training.optim): a step flagged False changes no
parameter, no state and no step counter, and every later step equals that of an optimizer that never saw it; the
training step's clip-and-update (lorafuse.training.update) on CUDA does it without a host synchronisation."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from lorafuse.training import optim
from lorafuse.training.optim import build_optimizer
from lorafuse.training.update import clip_and_step

FLAGS = [False, True, True, False, False, True, True]  # a cancelled first step (no states yet), then a streak
OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw_8bit"]


def _params(shapes, device, seed=0):
    """Trainable tensors of (shape, dtype, transposed) each; transposed ones are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype, transposed in shapes:
        t = torch.randn(shape, generator=g).to(dtype).to(device)
        out.append(torch.nn.Parameter(t.t() if transposed else t))
    return out


# An 8-bit-state size, an fp32-state size (< 4096 elements), a non-contiguous one, a bf16 one.
SHAPES = [((64, 80), torch.float32, False), ((7,), torch.float32, False), ((30, 200), torch.float32, True)]
SHAPES += [((4096,), torch.bfloat16, False)]


def _grads(params, steps, seed=1):
    """Each step's gradients; those of a cancelled step hold NaN and inf, as a diverged step's do."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for flag in FLAGS[:steps]:
        gs = [torch.randn(p.shape, generator=g).to(p.dtype).to(p.device) for p in params]
        if not flag:
            gs[0].view(-1)[::3] = math.nan
            gs[-1].view(-1)[0] = math.inf
        out.append(gs)
    return out


def _state(opt) -> list:
    sd = opt.state_dict()["state"]
    return [(i, k, v.cpu() if torch.is_tensor(v) else v) for i in sorted(sd) for k, v in sorted(sd[i].items())]


def _assert_equal_states(a, b):
    assert [(i, k) for i, k, _ in a] == [(i, k) for i, k, _ in b]
    for (i, k, x), (_, _, y) in zip(a, b):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), f"state {k} of parameter {i} differs"


@pytest.mark.parametrize("name", OPTIMIZERS + ["adamw, a few tensors at a time"])
def test_a_false_flag_changes_nothing_and_later_steps_equal_a_run_without_it(name, monkeypatch):
    if name.startswith("adamw,"):  # torch's AdamW masked in several pieces, as large adapters are
        monkeypatch.setattr(optim, "_MASKED_ELEMENTS", 5000)
        name = "adamw"
    flagged, skipping = _params(SHAPES, "cpu"), _params(SHAPES, "cpu")
    opt_f = build_optimizer(name, flagged, lr=1e-2, weight_decay=0.01)
    opt_s = build_optimizer(name, skipping, lr=1e-2, weight_decay=0.01)
    resumed = opt_r = None
    for k, (flag, grads) in enumerate(zip(FLAGS, _grads(flagged, len(FLAGS)))):
        before = [p.detach().clone() for p in flagged]
        for p, g in zip(flagged, grads):
            p.grad = g.clone()
        held = [p.grad for p in flagged]
        opt_f.step(apply=torch.tensor(flag))
        assert all(p.grad is g for p, g in zip(flagged, held))  # the same gradient tensors (CUDA graphs hold them)
        if not flag:
            assert all(torch.equal(p, b) for p, b in zip(flagged, before)), f"step {k} changed a parameter"
        else:
            for p, g in zip(skipping, grads):
                p.grad = g.clone()
            opt_s.step()  # the old loop: no step at all where the loss or the norm was not finite
        if resumed is not None:
            for p, g in zip(resumed, grads):
                p.grad = g.clone()
            opt_r.step(apply=torch.tensor(flag))
        assert all(torch.equal(a, b) for a, b in zip(flagged, skipping)), f"parameters differ after step {k}"
        if k == 3:  # a checkpoint right after a cancelled step: its state_dict has the counters taken back
            resumed = [torch.nn.Parameter(p.detach().clone()) for p in flagged]
            opt_r = build_optimizer(name, resumed, lr=1e-2, weight_decay=0.01)
            opt_r.load_state_dict(copy.deepcopy(opt_f.state_dict()))  # as saved and loaded: no shared tensors
    _assert_equal_states(_state(opt_f), _state(opt_s))
    _assert_equal_states(_state(opt_r), _state(opt_s))
    assert all(torch.equal(a, b) for a, b in zip(resumed, skipping))
    assert {int(s["step"]) for s in opt_f.state.values()} == {FLAGS.count(True)}


def _clip_and_step_run(name, device, flagged: bool):
    """The loop's update over FLAGS' steps: flagged (clip_and_step, the decision on the device) or the old way
    (the loss and norm read on the host, no optimizer step where either is not finite)."""
    shapes = [((16, 4096), torch.float32, False), ((4096, 16), torch.float32, False)]
    shapes += [((16, 11008), torch.float32, False), ((300, 257), torch.float32, False), ((64,), torch.float32, False)]
    params = _params(shapes, device, seed=3)  # LoRA A/B shapes of a 7B model, an odd 8-bit size, fp32 states
    opt = build_optimizer(name, params, lr=1e-3, weight_decay=0.01)
    skipped = []
    for k, grads in enumerate(_grads(params, len(FLAGS), seed=4)):
        loss = torch.tensor([2.5 if FLAGS[k] or k == 4 else math.nan], device=device)  # step 4: finite loss, inf grad
        for p, g in zip(params, grads):
            p.grad = g
        if flagged:
            # from the second step on (the first makes the 8-bit maps on the GPU, a one-time copy): no host sync
            check = _sync_debug("error") if device == "cuda" and k > 0 else contextlib.nullcontext()
            with check:
                values, reason = clip_and_step(opt, params, 1.0, loss, units=4)
            *_, applied = values.get()
            skipped.append(reason or (None if applied else "nan"))
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            ok = math.isfinite(float(loss[0])) and math.isfinite(norm)
            if ok:
                opt.step()
            skipped.append(None if ok else "nan")
        opt.zero_grad(set_to_none=True)
    return params, opt, skipped


@contextlib.contextmanager
def _sync_debug(mode: str):
    """torch raises on any operation that synchronises the host with the GPU (item, tolist, a pageable copy)."""
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def _check_update_against_the_old_way(name, device):
    ours, opt, skipped = _clip_and_step_run(name, device, flagged=True)
    ref, ref_opt, ref_skipped = _clip_and_step_run(name, device, flagged=False)
    assert skipped == ref_skipped == [None if f else "nan" for f in FLAGS]
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    _assert_equal_states(_state(opt), _state(ref_opt))


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_clip_and_step_equals_the_host_decision(name):
    _check_update_against_the_old_way(name, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_clip_and_step_on_cuda_equals_the_host_decision_without_a_sync(name):
    """LoRA shapes of a 7B model on the GPU: the fused multi-tensor 8-bit kernel reads the device flag, the fp32
    states and torch's AdamW are masked with torch.where; no step synchronises the host with the GPU."""
    _check_update_against_the_old_way(name, "cuda")

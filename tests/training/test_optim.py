"""8-bit AdamW (ours) against torch AdamW and bitsandbytes' 8-bit AdamW; schedules."""

from __future__ import annotations

import math

import pytest
import torch

from lorafuse.training.blockwise import dequantize_blockwise, dynamic_map, quantize_blockwise
from lorafuse.training.optim import LRSchedule, state_bytes
from lorafuse.training.optim8bit import AdamW8bit, PagedAdamW8bit

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    assert torch.equal(dynamic_map(signed), bnbF.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_roundtrip_is_nearest_code(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.rand(5000, generator=g) ** 4  # wide dynamic range per block
    x = x if signed else x.square()
    code = dynamic_map(signed)
    q, absmax = quantize_blockwise(x, code)
    back = dequantize_blockwise(q, absmax, code)
    # Derived bound: x / absmax lies in [-1, 1] ([0, 1] unsigned); nearest-code rounding errs by at most half
    # the widest gap between codes, or the distance from an end of the range to the outermost code (the
    # signed map has no -1), times the block's absmax.
    lo = -1.0 if signed else 0.0
    half_gap = max((code[1:] - code[:-1]).max() / 2, code[0] - lo, 1.0 - code[-1])
    block_absmax = absmax.repeat_interleave(256)[: x.numel()]
    rounding = 4 * torch.finfo(torch.float32).eps  # fp32 rounding of code * absmax and of the difference
    assert ((back - x).abs() <= (half_gap + rounding) * block_absmax).all()
    # bitsandbytes' quantizer is the reference: ours is never farther from x, element by element.
    qb, st = bnbF.quantize_blockwise(x, code=code, blocksize=256)
    ref = bnbF.dequantize_blockwise(qb, st)
    assert torch.equal(absmax, st.absmax)
    assert ((back - x).abs() <= (ref - x).abs() + 1e-12).all()


def _regression_run(make_opt, steps=150, seed=0):
    """Noisy minibatch least squares: W (128x64 = 8192 elements: 8-bit states) and b (64: fp32 states)."""
    g = torch.Generator().manual_seed(seed)
    X, W_true = torch.randn(256, 128, generator=g), torch.randn(128, 64, generator=g)
    Y = X @ W_true + 0.1 * torch.randn(256, 64, generator=g)
    W, b = torch.nn.Parameter(torch.zeros(128, 64)), torch.nn.Parameter(torch.zeros(64))
    opt = make_opt([W, b])
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = ((X[idx] @ W + b - Y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return W.detach(), b.detach(), opt, float(((X @ W + b - Y) ** 2).mean().detach())


def test_adamw8bit_trajectory_tracks_fp32_adamw_as_well_as_bitsandbytes():
    kw = dict(lr=1e-2, weight_decay=0.01)
    w32, _, _, loss32 = _regression_run(lambda p: torch.optim.AdamW(p, foreach=False, **kw))
    w8, _, _, loss8 = _regression_run(lambda p: AdamW8bit(p, **kw))
    wb, _, _, lossb = _regression_run(lambda p: bnb.optim.AdamW8bit(p, **kw))
    ours, theirs = (w8 - w32).norm() / w32.norm(), (wb - w32).norm() / w32.norm()
    # The bound: 8-bit states perturb the trajectory; ours may not drift from fp32 AdamW more than 1.5x as
    # much as bitsandbytes' 8-bit AdamW (same maps and block size, so the same quantization noise level).
    assert ours <= 1.5 * theirs
    # Same algorithm: ours stays closer to bitsandbytes than either is to fp32.
    assert (w8 - wb).norm() / w32.norm() < min(ours, theirs)
    assert abs(loss8 - loss32) <= 1.5 * abs(lossb - loss32) + 1e-3 * loss32


def test_small_parameters_keep_fp32_states_and_match_adamw():
    p64 = torch.randn(3000, dtype=torch.float64)
    grads = [torch.randn(3000, dtype=torch.float64) for _ in range(20)]

    def run(opt_cls, dtype, **kw):
        p = torch.nn.Parameter(p64.to(dtype).clone())
        opt = opt_cls([p], lr=1e-2, weight_decay=0.1, **kw)
        for gr in grads:
            p.grad = gr.to(dtype)
            opt.step()
        return p.detach().double(), opt

    exact, _ = run(torch.optim.AdamW, torch.float64, foreach=False)
    ref32, _ = run(torch.optim.AdamW, torch.float32, foreach=False)
    ours, opt = run(AdamW8bit, torch.float32)
    assert opt.state[opt.param_groups[0]["params"][0]]["m"].dtype == torch.float32
    assert (ours - exact).abs().max() <= 2 * (ref32 - exact).abs().max()


def test_8bit_state_memory_is_about_4x_smaller():
    p = [torch.nn.Parameter(torch.randn(256, 256))]
    p[0].grad = torch.randn(256, 256)
    ours, ref = AdamW8bit(p), torch.optim.AdamW(p)
    ours.step()
    ref.step()
    ratio = state_bytes(ref) / state_bytes(ours)
    # 8 bytes/element (two fp32 states) vs 2 bytes + 2 fp32 absmax per 256 elements: 8 / 2.03125 = 3.94
    assert ratio == pytest.approx(8 / (2 + 8 / 256), rel=1e-3)


def test_state_dict_roundtrip_continues_bit_for_bit():
    torch.manual_seed(0)
    grads = [torch.randn(64, 128) for _ in range(6)]
    p1 = torch.nn.Parameter(torch.randn(64, 128))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = AdamW8bit([p1], lr=1e-2)
    for gr in grads[:3]:
        p1.grad = gr
        o1.step()
    saved = {k: v for k, v in o1.state_dict().items()}
    p2.data.copy_(p1.data)
    o2 = AdamW8bit([p2], lr=1e-2)
    o2.load_state_dict(saved)
    for gr in grads[3:]:
        p1.grad, p2.grad = gr, gr.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)


def test_load_state_dict_keeps_fp32_absmax_for_bf16_params():
    p = torch.nn.Parameter(torch.randn(8192, dtype=torch.bfloat16))
    p.grad = torch.randn(8192, dtype=torch.bfloat16)
    opt = AdamW8bit([p])
    opt.step()
    absmax = opt.state[p]["m_absmax"].clone()
    opt2 = AdamW8bit([p])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["m_absmax"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["m_absmax"], absmax)


def test_paged_equals_8bit_on_cpu():
    torch.manual_seed(1)
    grads = [torch.randn(100, 100) for _ in range(4)]
    init = torch.randn(100, 100)
    out = []
    for cls in (AdamW8bit, PagedAdamW8bit):
        p = torch.nn.Parameter(init.clone())
        opt = cls([p], lr=1e-2)
        for gr in grads:
            p.grad = gr
            opt.step()
        out.append(p.detach())
    assert torch.equal(out[0], out[1])


@pytest.mark.gpu
def test_paged_on_cuda_keeps_states_on_host_and_equals_8bit():
    torch.manual_seed(2)
    grads = [torch.randn(300, 257, device="cuda") for _ in range(5)]
    init = torch.randn(300, 257, device="cuda")
    small = torch.randn(100, device="cuda")
    results, opts = [], []
    for cls in (AdamW8bit, PagedAdamW8bit):
        p, s = torch.nn.Parameter(init.clone()), torch.nn.Parameter(small.clone())
        # host_states=True: without memory pressure (an H200 and two small tensors) paged states stay on the GPU
        opt = cls([p, s], lr=1e-2, **({"host_states": True} if cls is PagedAdamW8bit else {}))
        for gr in grads:
            p.grad, s.grad = gr, gr[0, :100].clone()
            opt.step()
        torch.cuda.synchronize()
        results.append((p.detach().clone(), s.detach().clone()))
        opts.append((opt, p, s))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    paged, p, s = opts[1]
    for t in (paged.state[p]["m_q"], paged.state[p]["v_absmax"], paged.state[s]["m"]):
        assert t.device.type == "cpu" and t.is_pinned()
    blob = paged.state_dict()
    reloaded = PagedAdamW8bit([p, s], host_states=True)
    reloaded.load_state_dict(blob)
    assert reloaded.state[p]["m_q"].device.type == "cpu" and reloaded.state[p]["m_q"].is_pinned()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw8bit_on_cuda_one_launch_a_step_equals_per_parameter_launches(dtype, monkeypatch):
    """LoRA shapes of a 7B model, gradients re-allocated every step (zero_grad(set_to_none=True)): the
    multi-tensor step equals one kernel per parameter bit for bit, in one launch a step."""
    import lorafuse.kernels.adamw8bit as K

    torch.manual_seed(3)
    shapes = [(16, 4096), (4096, 16), (16, 11008), (11008, 16)] * 4 + [(300, 257), (64,)]  # (64,): fp32 states
    init = [torch.randn(s, device="cuda").to(dtype) * 0.02 for s in shapes]
    grads = [[torch.randn(s, device="cuda").to(dtype) for s in shapes] for _ in range(3)]
    kernel, grids = K._adamw8bit_multi_kernel, []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    runs = []
    for multi in (True, False):
        with monkeypatch.context() as mp:
            if multi:
                mp.setattr(K, "_adamw8bit_multi_kernel", Spy())
            else:
                mp.setattr(AdamW8bit, "_multi_tensor", lambda self, params, *group_and_flag: params)
            ps = [torch.nn.Parameter(t.clone()) for t in init]
            opt = AdamW8bit(ps, lr=1e-3, weight_decay=0.01)
            for gs in grads:
                opt.zero_grad(set_to_none=True)
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                opt.step()
            torch.cuda.synchronize()
            runs.append((ps, opt))
    assert len(grids) == 3
    (ps, opt), (ref, ref_opt) = runs
    for p, r in zip(ps, ref):
        assert torch.equal(p, r)
        assert all(torch.equal(opt.state[p][k], ref_opt.state[r][k]) for k in opt.state[p] if k != "step")


def test_schedules():
    s = LRSchedule(1.0, total_steps=100, warmup_steps=10, kind="cosine")
    assert [s.lr_at(i) for i in range(3)] == [0.1, 0.2, 0.3]
    assert s.lr_at(9) == 1.0 and s.lr_at(10) == 1.0
    assert s.lr_at(55) == pytest.approx(0.5)  # halfway through the decay
    assert 0 < s.lr_at(99) < 1e-3
    lin = LRSchedule(1.0, total_steps=100, warmup_steps=0.1, kind="linear")
    assert lin.warmup == 10 and lin.lr_at(55) == pytest.approx(0.5) and lin.lr_at(99) == pytest.approx(1 / 90)
    const = LRSchedule(2e-4, total_steps=50, warmup_steps=0.03, kind="constant")
    assert const.warmup == math.ceil(1.5) and const.lr_at(1) == 2e-4 and const.lr_at(49) == 2e-4


def test_zero_grad_in_place_keeps_the_tensors_a_graph_recorded():
    """set_to_none=False (the CUDA-graph step): every gradient zeroed where it lies, fp32 and bf16 alike (one
    multi-tensor launch each); set_to_none=True drops them; a parameter without a gradient stays without one."""
    ps = [torch.nn.Parameter(torch.randn(300, dtype=dt)) for dt in (torch.float32, torch.bfloat16, torch.float32)]
    opt = AdamW8bit(ps, lr=1e-3)
    for p in ps[:2]:
        p.grad = torch.randn_like(p)
    held = [p.grad for p in ps[:2]]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(ps, held))
    assert ps[2].grad is None
    opt.zero_grad()
    assert all(p.grad is None for p in ps)

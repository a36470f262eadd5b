"""The fused 8-bit AdamW kernel equals the PyTorch reference update (lorafuse.training.optim8bit.AdamW8bit); the
multi-tensor launch equals the per-parameter kernel bit for bit."""

from __future__ import annotations

import pytest
import torch

import lorafuse.kernels.adamw8bit as K
from lorafuse.kernels.adamw8bit import LaunchTables, adamw8bit_multi_update, adamw8bit_update, midpoints
from lorafuse.training.blockwise import dequantize_blockwise, dynamic_map
from lorafuse.training.optim8bit import AdamW8bit

STATE_KEYS = ("m_q", "m_absmax", "v_q", "v_absmax")
HYPER = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.01)
# fp16 parameters: lanes past the end of a parameter compute an update that overflows fp16 and is never stored;
# numpy (the interpreter) warns about the cast.
fp16_masked_lanes = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def _states(n, device, seed):
    """Non-trivial states: run a few reference steps from random gradients."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g).to(device))
    opt = AdamW8bit([p], lr=1e-2, weight_decay=0.01, min_8bit_size=1)
    for _ in range(3):
        p.grad = torch.randn(n, generator=g).to(device)
        opt.step()
    return p, opt


@pytest.mark.parametrize("n", [4096, 1000])
def test_fused_update_matches_reference(n, device, monkeypatch):
    monkeypatch.setattr(AdamW8bit, "_fused", lambda *args: False)  # opt.step() below is the PyTorch reference
    p_ref, opt = _states(n, device, seed=n)
    state_ref = opt.state[p_ref]
    p_k = p_ref.detach().clone()
    state_k = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state_ref.items()}
    grad = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(device) * 3
    p_ref.grad = grad.clone()
    opt.step()  # reference (CPU path: PyTorch ops)

    smap, umap = dynamic_map(True).to(device), dynamic_map(False).to(device)
    step = state_ref["step"]
    ran = adamw8bit_update(
        p_k.view(-1), grad, state_k, smap, umap, midpoints(smap), midpoints(umap), step, 1e-2, 0.9, 0.999, 1e-8, 0.01
    )
    assert ran
    # The parameter update: same fp32 formula; rounding may differ by an ulp or two of p.
    err = (p_k - p_ref.detach()).abs().max().item()
    assert err <= 4 * torch.finfo(torch.float32).eps * p_ref.detach().abs().max().item()
    # Block maxima are computed from the same m, v: equal up to fp32 rounding.
    for key in ("m_absmax", "v_absmax"):
        torch.testing.assert_close(state_k[key], state_ref[key], rtol=1e-6, atol=0)
    # Codes: identical except where a value sits within rounding of a decision boundary (one code apart at most).
    for key, code in (("m", smap), ("v", umap)):
        dq = (state_k[f"{key}_q"].long() - state_ref[f"{key}_q"].long()).abs()
        assert dq.max().item() <= 1 and (dq > 0).float().mean().item() < 0.01
        a = dequantize_blockwise(state_k[f"{key}_q"], state_k[f"{key}_absmax"], code)
        b = dequantize_blockwise(state_ref[f"{key}_q"], state_ref[f"{key}_absmax"], code)
        assert torch.isfinite(a).all() and (a - b).abs().max() <= (code.diff().max() * b.abs().max())


@fp16_masked_lanes
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/inf gradients, in numpy
@pytest.mark.parametrize("multi", [False, True])
def test_a_false_apply_flag_writes_nothing_and_a_true_one_is_the_plain_update(multi, device):
    """The device-side skip (the training loop's non-finite step): with apply False the kernels leave every bit of
    p and the states as they were, even for NaN/inf gradients; apply True is bit for bit the update without a flag."""
    sizes, maps, gen = [700, 256, 3], _maps(device), torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).to(device) for n in sizes]
    states = [_zero_states(n, device) for n in sizes]
    for p, s in zip(params, states):  # non-trivial states first
        assert adamw8bit_update(p, _grad(p.numel(), torch.float32, device, gen), s, *maps, 1, *HYPER.values())
    grads = [_grad(n, torch.float32, device, gen) for n in sizes]
    poisoned = [g.clone() for g in grads]
    poisoned[0][::5], poisoned[1][3] = float("nan"), float("inf")
    runs = {}
    for apply in (torch.tensor(False, device=device), torch.tensor(True, device=device), None):
        gs = poisoned if apply is not None and not apply else grads
        ps = [p.clone() for p in params]
        ss = [{k: v.clone() for k, v in s.items()} for s in states]
        if multi:
            assert adamw8bit_multi_update(ps, gs, ss, *maps, 2, *HYPER.values(), LaunchTables(), apply=apply)
        else:
            for p, g, s in zip(ps, gs, ss):
                assert adamw8bit_update(p, g, s, *maps, 2, *HYPER.values(), apply=apply)
        runs[None if apply is None else bool(apply)] = (ps, ss)
    _assert_same(*runs[False], params, states)
    _assert_same(*runs[True], *runs[None])
    assert not all(torch.equal(a, b) for a, b in zip(runs[True][0], params))  # the update did change p


def test_fused_update_declines_other_blocksizes(device):
    p = torch.randn(1024, device=device)
    state = {
        "m_q": torch.zeros(1024, dtype=torch.uint8, device=device),
        "m_absmax": torch.zeros(8, device=device),
        "v_q": torch.zeros(1024, dtype=torch.uint8, device=device),
        "v_absmax": torch.zeros(8, device=device),
    }
    smap, umap = dynamic_map(True).to(device), dynamic_map(False).to(device)
    assert not adamw8bit_update(
        p, p.clone(), state, smap, umap, midpoints(smap), midpoints(umap), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0
    )


def _maps(device):
    smap, umap = dynamic_map(True).to(device), dynamic_map(False).to(device)
    return smap, umap, midpoints(smap), midpoints(umap)


def _zero_states(n, device):
    blocks = -(-n // 256)
    return {
        "m_q": torch.zeros(n, dtype=torch.uint8, device=device),
        "m_absmax": torch.zeros(blocks, device=device),
        "v_q": torch.zeros(n, dtype=torch.uint8, device=device),
        "v_absmax": torch.zeros(blocks, device=device),
    }


def _grad(n, dtype, device, gen):
    """Random gradient with a wide range inside each block (small values exercise the map's log scale)."""
    return (torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4 * 3).to(dtype).to(device)


class _Launches:
    """Stands in for a jit kernel in K's namespace: records each launch's grid and constexprs, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.meta = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
            self.meta.append({k: v for k, v in kwargs.items() if k.endswith("DTYPE")})
            return self.kernel[grid](*args, **kwargs)

        return launch


def _assert_same(params_a, states_a, params_b, states_b):
    for i, (pa, pb, sa, sb) in enumerate(zip(params_a, params_b, states_a, states_b)):
        assert torch.equal(pa, pb), f"parameter {i} differs"
        for k in STATE_KEYS:
            assert torch.equal(sa[k], sb[k]), f"{k} of parameter {i} differs"


def _multi_vs_per_param(sizes, p_dtype, g_dtype, device, steps=3, seed=0):
    """`steps` updates of the same parameters by the multi-tensor launch and by the per-parameter kernel."""
    gen = torch.Generator().manual_seed(seed)
    multi = [torch.randn(n, generator=gen).to(p_dtype).to(device) for n in sizes]
    single = [p.clone() for p in multi]
    s_multi, s_single = [_zero_states(n, device) for n in sizes], [_zero_states(n, device) for n in sizes]
    maps, tables = _maps(device), LaunchTables()
    for step in range(1, steps + 1):
        grads = [_grad(n, g_dtype, device, gen) for n in sizes]
        for p, g, s in zip(single, grads, s_single):
            assert adamw8bit_update(p, g, s, *maps, step, *HYPER.values())
        assert adamw8bit_multi_update(multi, grads, s_multi, *maps, step, *HYPER.values(), tables)
        tables.prune()
    return multi, s_multi, single, s_single


@fp16_masked_lanes
@pytest.mark.parametrize("p_dtype,g_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_multi_tensor_update_equals_per_parameter_kernel(p_dtype, g_dtype, device, monkeypatch):
    spy = _Launches(K._adamw8bit_multi_kernel)
    monkeypatch.setattr(K, "_adamw8bit_multi_kernel", spy)
    sizes = [700, 256, 3, 1]  # not a multiple of 256, one whole block, tiny ones
    _assert_same(*_multi_vs_per_param(sizes, p_dtype, g_dtype, device))
    assert spy.grids == [(3 + 1 + 1 + 1,)] * 3  # one launch a step, one program per 256-block


def test_multi_tensor_tables_are_cached_and_follow_moved_pointers(device):
    gen = torch.Generator().manual_seed(1)
    sizes = [700, 256, 5]
    multi = [torch.randn(n, generator=gen).to(device) for n in sizes]
    single = [p.clone() for p in multi]
    s_multi, s_single = [_zero_states(n, device) for n in sizes], [_zero_states(n, device) for n in sizes]
    maps, tables = _maps(device), LaunchTables()
    grads = [_grad(n, torch.float32, device, gen) for n in sizes]
    kept, seen = [], []
    for step in range(1, 4):
        if step == 3:  # re-allocated gradients (zero_grad(set_to_none=True)); the old ones stay alive elsewhere
            kept.append(grads)
            grads = [_grad(n, torch.float32, device, gen) for n in sizes]
        else:
            for g in grads:  # in place: same addresses (CUDA graphs' static gradients)
                g.copy_(_grad(g.numel(), torch.float32, device, gen))
        seen.append(tables.get(multi, grads, s_multi, multi[0].device)[0])
        for p, g, s in zip(single, grads, s_single):
            assert adamw8bit_update(p, g, s, *maps, step, *HYPER.values())
        assert adamw8bit_multi_update(multi, grads, s_multi, *maps, step, *HYPER.values(), tables)
        tables.prune()
        _assert_same(multi, s_multi, single, s_single)
    assert seen[1] is seen[0] and seen[2] is not seen[1]  # cached while the addresses stay, rebuilt when they move
    assert len(tables._ptrs) == 1  # the stale table was dropped


def _optimizer_run(device, multi: bool, monkeypatch, steps=3):
    """Params that split into several launches: two dtypes, two step counts (d and e get no gradient at step 1),
    a non-contiguous one (per-parameter kernel), a 2-element one (fp32 states: PyTorch)."""
    gen = torch.Generator().manual_seed(2)
    shapes = {
        "a": ((300,), torch.float32),
        "c": ((5,), torch.float32),
        "d": ((260,), torch.float32),
        "e": ((3,), torch.float32),
        "f": ((300,), torch.float16),
        "h": ((3,), torch.float16),
        "t": ((10, 20), torch.float32),
        "s": ((2,), torch.float32),
    }
    params = {
        k: torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(device))
        for k, (shape, dtype) in shapes.items()
    }
    params["t"] = torch.nn.Parameter(params["t"].detach().t())  # non-contiguous
    opt = AdamW8bit(list(params.values()), lr=1e-2, weight_decay=0.01, min_8bit_size=3)
    spies = _Launches(K._adamw8bit_multi_kernel), _Launches(K._adamw8bit_kernel)
    with monkeypatch.context() as mp:
        mp.setattr(K, "_adamw8bit_multi_kernel", spies[0])
        mp.setattr(K, "_adamw8bit_kernel", spies[1])
        if not multi:
            mp.setattr(AdamW8bit, "_multi_tensor", lambda self, ps, *group_and_flag: ps)
        launches = []
        for step in range(steps):
            for k, p in params.items():
                p.grad = None if step == 0 and k in "de" else _grad(p.numel(), p.dtype, device, gen).view_as(p)
            opt.step()
            launches.append((len(spies[0].grids), len(spies[1].grids)))
    return params, opt, spies, launches


@fp16_masked_lanes
def test_adamw8bit_step_launches_once_per_dtype_and_step_count(device, monkeypatch):
    params, opt, spies, launches = _optimizer_run(device, True, monkeypatch)
    ref, ref_opt, _, ref_launches = _optimizer_run(device, False, monkeypatch)
    # multi-tensor launches: {a, c} + {f, h} at step 1, then also {d, e} one step behind; t alone per parameter
    assert launches == [(2, 1), (5, 2), (8, 3)]
    assert sorted(str(m["P_DTYPE"]) for m in spies[0].meta[:2]) == ["fp16", "fp32"]
    assert ref_launches == [(0, 5), (0, 12), (0, 19)]  # multi-tensor off: one kernel per 8-bit parameter
    for k, p in params.items():
        assert torch.equal(p, ref[k]), k
        st, ref_st = opt.state[p], ref_opt.state[ref[k]]
        assert st.keys() == ref_st.keys() and st["step"] == ref_st["step"] == (2 if k in "de" else 3)
        assert all(torch.equal(st[key], ref_st[key]) for key in st if key != "step"), k


def test_checkpoint_of_the_per_parameter_path_resumes_in_multi_tensor_launches(device, monkeypatch):
    """The state layout did not change: states written by per-parameter steps continue in one launch a step,
    exactly as an uninterrupted per-parameter run."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen).to(device) for n in (300, 5)]
    grads = [[_grad(n, torch.float32, device, gen) for n in (300, 5)] for _ in range(4)]

    def run(ps, steps):
        opt = AdamW8bit(ps, lr=1e-2, weight_decay=0.01, min_8bit_size=1)
        for gs in steps:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return opt

    with monkeypatch.context() as mp:  # the per-parameter path: what wrote earlier checkpoints
        mp.setattr(AdamW8bit, "_multi_tensor", lambda self, params, *group_and_flag: params)
        ref = [torch.nn.Parameter(t.clone()) for t in init]
        ref_opt = run(ref, grads)
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        saved = run(ps, grads[:2]).state_dict()
    opt = AdamW8bit(ps, lr=1e-2, weight_decay=0.01, min_8bit_size=1)
    opt.load_state_dict(saved)
    spy = _Launches(K._adamw8bit_multi_kernel)
    monkeypatch.setattr(K, "_adamw8bit_multi_kernel", spy)
    for gs in grads[2:]:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    assert len(spy.grids) == 2
    _assert_same(ps, [opt.state[p] for p in ps], ref, [ref_opt.state[p] for p in ref])
    assert [opt.state[p]["step"] for p in ps] == [4, 4]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_update_is_bit_identical_on_cuda(dtype):
    """The LoRA shapes of a 7B model (one layer's worth, plus odd and tiny ones) on the GPU, bf16 included."""
    sizes = [16 * 4096, 4096 * 16, 16 * 11008, 11008 * 16, 16 * 4096 + 77, 1000, 3]
    _assert_same(*_multi_vs_per_param(sizes, dtype, dtype, torch.device("cuda"), steps=3))

"""The fused 8-bit AdamW kernel equals the PyTorch reference update (lorafuse.train.optim.AdamW8bit)."""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels.adamw8bit import adamw8bit_update, midpoints
from lorafuse.train.optim import AdamW8bit, dequantize_blockwise, dynamic_map


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
def test_fused_update_matches_reference(n, device):
    p_ref, opt = _states(n, device, seed=n)
    state_ref = opt.state[p_ref]
    p_k = p_ref.detach().clone()
    state_k = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state_ref.items()}
    grad = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(device) * 3
    p_ref.grad = grad.clone()
    opt.step()  # reference (CPU path: PyTorch ops)

    smap, umap = dynamic_map(True).to(device), dynamic_map(False).to(device)
    step = state_ref["step"]
    ran = adamw8bit_update(p_k.view(-1), grad, state_k, smap, umap, midpoints(smap), midpoints(umap),
                           step, 1e-2, 0.9, 0.999, 1e-8, 0.01)
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


def test_fused_update_declines_other_blocksizes(device):
    p = torch.randn(1024, device=device)
    state = {"m_q": torch.zeros(1024, dtype=torch.uint8, device=device), "m_absmax": torch.zeros(8, device=device),
             "v_q": torch.zeros(1024, dtype=torch.uint8, device=device), "v_absmax": torch.zeros(8, device=device)}
    smap, umap = dynamic_map(True).to(device), dynamic_map(False).to(device)
    assert not adamw8bit_update(p, p.clone(), state, smap, umap, midpoints(smap), midpoints(umap),
                                1, 1e-3, 0.9, 0.999, 1e-8, 0.0)

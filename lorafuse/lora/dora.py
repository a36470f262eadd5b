"""DoRA (weight-decomposed low-rank adaptation) math, with peft 0.21.2's exact semantics.

DoRA splits the adapted weight into a direction and a learned per-row magnitude m (out,):

    V   = W + s·(B @ A)                       (out, in)   s = alpha/r (or alpha/sqrt(r) with rslora)
    W'  = (m / ||V||_row)[:, None] * V        the merged weight
    m0  = ||W + s·(B @ A)||_row               init (B = 0 at init, so m0 = ||W||_row)

Forward, as peft computes it (`peft/tuners/lora/dora.py` DoraLinearLayer.forward), for x (..., in) already cast
to the LoRA dtype and `result` the base output (..., out) including the bias:

    g   = m / ||W + s·(B@A).detach()||_row    the norm is detached (DoRA paper §4.3): no gradient through it
    base = result - bias                      no dropout (or eval mode): reuse the base output
    base = dropout(x) @ W^T                   dropout active: the base term is recomputed on the dropped x
    y   = result + (g - 1) * base + g * (B(A(x_d)) * s)       x_d = dropout(x) or x

With no dropout this is exactly x @ W'^T + bias. W is used in the LoRA dtype (fp32 by default): a dense weight
is upcast, an NF4 weight is dequantized to the compute dtype first and then upcast, so a QLoRA layer and a
LoRA layer holding the dequantized weight see identical values. The norm is computed under no_grad, so the
dense (out, in) weight is a temporary and is never saved for backward.

Dtype policy: norms and merge math run in fp32 (or the LoRA dtype if wider); callers cast the merged weight back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def weight_norm(weight: Tensor, lora_weight: Tensor, scaling: float) -> Tensor:
    """Row norms ||W + scaling·lora_weight||_2, shape (out,), in the promoted dtype of the two inputs."""
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1)


@torch.no_grad()
def init_magnitude(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """peft's magnitude init: ||W + s·(B @ A)||_row. weight: (out, in) dense in its own dtype; A (r, in); B (out, r).

    peft promotes W to the LoRA dtype through the sum (fp32 LoRA weights -> fp32 norm); fp16 LoRA weights are
    upcast to fp32 for the product because fp16 matmul on CPU was unreliable in old torch (kept for parity).
    """
    lora_dtype = lora_A.dtype
    if lora_dtype == torch.float16:
        lora_weight = (lora_B.float() @ lora_A.float()).half()
    else:
        lora_weight = lora_B @ lora_A
    return weight_norm(weight.to(lora_weight.device), lora_weight, scaling).to(lora_dtype)


def dora_forward(
    x: Tensor,
    result: Tensor,
    *,
    bias: Tensor | None,
    magnitude: Tensor,
    lora_A: nn.Linear,
    lora_B: nn.Linear,
    scaling: float,
    dropout: nn.Module,
    training: bool,
    base_weight: Callable[[torch.dtype], Tensor],
    base_linear: Callable[[Tensor], Tensor],
) -> Tensor:
    """The layer output y = result + DoRA term (see module docstring), in the promoted dtype of `result` and x.

    x: (..., in) in the LoRA dtype. result: base output (..., out) with bias. base_weight(dtype) returns the dense
    (out, in) weight in `dtype`; base_linear(x) returns x @ W^T without bias in x's dtype (used only with dropout,
    and for an NF4 weight it must not keep a dense W alive: the caller passes the NF4 autograd function).
    """
    with torch.no_grad():
        w = base_weight(x.dtype)
        lora_weight = (lora_B.weight @ lora_A.weight).to(x.dtype)
        norm = weight_norm(w, lora_weight, scaling)
        del w
    mag_norm_scale = (magnitude / norm).view(1, -1)
    if isinstance(dropout, nn.Identity) or not training:
        x_d = x
        base_result = result if bias is None else result - bias
    else:
        x_d = dropout(x)
        base_result = base_linear(x_d)
    lora_result = lora_B(lora_A(x_d))
    # Same association as peft: result + (((g - 1) * base) + ((g * lora) * s)).
    return result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling)


@torch.no_grad()
def merged_weight(weight: Tensor, delta: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """W' = (m / ||W + delta||_row)[:, None] * (W + delta), in fp32; also returns the norm (needed to unmerge).

    weight: (out, in) any float dtype; delta = s·(B @ A) (out, in) fp32.
    """
    w32 = weight.float()
    delta = delta.float()
    norm = weight_norm(w32, delta, 1.0)
    factor = (magnitude.float() / norm).view(-1, 1)
    return factor * (w32 + delta), norm


@torch.no_grad()
def unmerged_weight(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """Invert `merged_weight` with the norm saved at merge time: W = W' / factor - delta, in fp32."""
    factor = (magnitude.float() / norm.float()).view(-1, 1)
    return merged.float() / factor - delta.float()

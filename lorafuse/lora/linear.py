"""Frozen NF4 linear layers and the LoRA linear layer (peft 0.21.2 semantics).

Shapes: x (..., in) -> y (..., out); W (out, in); A = lora_A.weight (r, in); B = lora_B.weight (out, r).

    y = x @ W^T + bias + s · B(A(dropout(x)))        s = alpha / r, or alpha / sqrt(r) with rslora

`nf4_linear(x, w, bias)` is an autograd function: forward dequantizes the NF4 weight to x's dtype and computes
x @ W^T (+ bias); backward dequantizes again and returns grad_x = grad_y @ W (and the bias gradient if asked).
W is frozen, so there is no weight gradient, and only the NF4Weight reference is kept between forward and
backward: the dense (out, in) weight lives only inside each call (4 bits per weight stay resident, not 16).

Dtype policy (peft's `lora.Linear.forward`):
  * the base path runs in the compute dtype (dense: W's dtype; NF4: `compute_dtype`) and returns x's dtype;
  * the LoRA path casts x to the LoRA dtype (fp32 by default), and the sum base + s·B(A(x)) is formed in the
    promoted dtype, then cast back to the base output dtype once. (peft's 4-bit layer instead rounds the LoRA
    term to the compute dtype before adding; we use the dense rule for both, so QLoRA equals LoRA on the
    dequantized weight exactly.)
  * an NF4 weight is seen as `dequantize(compute_dtype)` everywhere (forward, DoRA norms, `base_weight`), so a
    QLoRA layer equals a LoRA layer whose dense weight is that tensor.

Init as peft: A ~ kaiming_uniform(a=sqrt(5)) ("kaiming") or N(0, std=1/r) ("gaussian", peft's std); B = 0.
DoRA: see `lorafuse.lora.dora` (magnitude vector `lora_magnitude_vector`, shape (out,)).

State-dict keys are HF's plus peft's saved adapter keys: "<name>.weight" (+ bitsandbytes' five extra keys
"<name>.weight.absmax", ... when NF4), "<name>.bias", "<name>.lora_A.weight", "<name>.lora_B.weight", and
"<name>.lora_magnitude_vector" for DoRA. That last key is peft's on-disk name (peft holds it in memory as
"lora_magnitude_vector.default.weight" and strips ".weight" on save), so an adapter file needs only the
"base_model.model." prefix, no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafuse.errors import LorafuseError
from lorafuse.lora import dora as _dora
from lorafuse.quant.bnb_format import bnb_state_dict, from_bnb_state_dict
from lorafuse.quant.nf4 import NF4Weight, quantize_nf4


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with W = dequantize(NF4) rounded to `weight_dtype`, then cast to x's dtype.

    Backward: dy/dx = W, so grad_x = grad_y @ W (W dequantized again); grad_b = grad_y summed over all leading
    dims. Saved for backward: the NF4Weight object only (no tensor of size out x in).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_dtype):
        w = weight.dequantize(weight_dtype).to(x.dtype)
        ctx.nf4 = weight
        ctx.weight_dtype = weight_dtype
        ctx.has_bias = bias is not None
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = ctx.nf4.dequantize(ctx.weight_dtype).to(grad_y.dtype)
            grad_x = grad_y @ w
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_b, None


def nf4_linear(x: Tensor, w: NF4Weight, bias: Tensor | None = None, weight_dtype: torch.dtype | None = None) -> Tensor:
    """x @ dequantize(w)^T + bias without keeping the dense weight alive for backward.

    The weight is dequantized to `weight_dtype` (default: x's dtype) and then cast to x's dtype; passing the
    compute dtype while x is fp32 reproduces a dense weight stored in the compute dtype and upcast.
    """
    return _NF4LinearFunction.apply(x, w, bias, weight_dtype or x.dtype)


class _NF4Holder:
    """Makes a module whose `weight` is an NF4Weight (a plain attribute) behave like one with a Parameter.

    `_apply` (behind .to()/.cuda()/.half()/.float()) moves the NF4 tensors to the new device but never casts the
    packed data: a float cast only changes the compute dtype. The state dict carries bitsandbytes' six keys
    under "<prefix>weight"; loading accepts those keys, or a dense float weight, which is quantized on load.
    """

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype if isinstance(self.weight, NF4Weight) else self.weight.dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if isinstance(self.weight, NF4Weight):
            # fn is opaque (a closure of .to()/.cuda()/.half()); applying it to an empty probe tells the
            # target device and dtype without touching the packed data.
            probe = fn(torch.empty(0, dtype=self._compute_dtype, device=self.weight.device))
            if probe.device != self.weight.device:
                self.weight = self.weight.to(probe.device)
            if probe.is_floating_point():
                self._compute_dtype = probe.dtype
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if isinstance(self.weight, NF4Weight):
            destination.update(bnb_state_dict(self.weight, prefix))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if not isinstance(self.weight, NF4Weight):
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        key = prefix + "weight"
        own = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in own:
            if strict:
                missing_keys.append(key)
            return
        try:
            self.weight = self._nf4_from_state(own, prefix)
        except ValueError as e:  # reported with the other size mismatches; a ModelError (bad checkpoint) propagates
            error_msgs.append(f"While loading {key}: {e}")

    def _nf4_from_state(self, own: dict, prefix: str) -> NF4Weight:
        key, cur = prefix + "weight", self.weight
        if any(k.startswith(key + ".quant_state.") for k in own):
            new = from_bnb_state_dict(own, prefix)
        elif own[key].is_floating_point():
            new = quantize_nf4(own[key].to(cur.device), blocksize=cur.blocksize, double_quant=cur.double_quant)
        else:
            raise ValueError("a packed 4-bit weight without its quant_state keys (weight.quant_state.*)")
        if tuple(new.shape) != tuple(cur.shape):
            raise ValueError(f"shape {tuple(new.shape)} in the checkpoint, {tuple(cur.shape)} in the model")
        return new.to(cur.device)


def _frozen(t: Tensor | None, dtype: torch.dtype | None = None) -> nn.Parameter | None:
    if t is None:
        return None
    if isinstance(t, nn.Parameter) and (dtype is None or t.dtype == dtype):
        return t.requires_grad_(False)
    return nn.Parameter(t.detach().to(dtype or t.dtype), requires_grad=False)


class NF4Linear(_NF4Holder, nn.Module):
    """A frozen linear layer whose weight is an NF4Weight: y = x @ dequantize(W)^T + bias in `compute_dtype`.

    The output has x's dtype (x is cast to the compute dtype and the result back, as bitsandbytes' Linear4bit).
    """

    def __init__(self, weight: NF4Weight, bias: Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.weight = weight
        self._compute_dtype = compute_dtype or weight.dtype
        self.bias = _frozen(bias, self._compute_dtype)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None
    ) -> NF4Linear:
        w = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(w, linear.bias, compute_dtype or linear.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return nf4_linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4(blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}), "
            f"compute_dtype={self.compute_dtype}"
        )


class LoRALinear(_NF4Holder, nn.Module):
    """A frozen base linear (dense Parameter or NF4Weight) plus a trainable low-rank update (see module docstring)."""

    def __init__(
        self,
        weight: Tensor | NF4Weight,
        bias: Tensor | None,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        init: str = "kaiming",
        lora_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be a positive integer, got {r}")
        if isinstance(weight, NF4Weight):
            self.weight = weight
            self._compute_dtype = compute_dtype or weight.dtype
        else:
            self.weight = _frozen(weight)
        self.bias = _frozen(bias, self.compute_dtype)
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.r, self.alpha, self.use_rslora, self.use_dora = int(r), alpha, bool(rslora), bool(dora)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        self.reset_lora_parameters(init)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(
                _dora.init_magnitude(self.base_weight(), self.lora_A.weight, self.lora_B.weight, self.scaling)
            )
        self.merged = False
        self.disabled = False  # the adapter switched off: the base layer alone (lorafuse.lora.disable)
        self._merged_norm: Tensor | None = None  # DoRA row norms at merge time, needed to unmerge (as peft)

    @classmethod
    def from_linear(
        cls,
        base: nn.Linear | NF4Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        init: str = "kaiming",
        lora_dtype: torch.dtype = torch.float32,
    ) -> LoRALinear:
        if isinstance(base, NF4Linear):
            return cls(base.weight, base.bias, r, alpha, dropout, rslora, dora, init, lora_dtype, base.compute_dtype)
        if isinstance(base, nn.Linear):
            return cls(base.weight, base.bias, r, alpha, dropout, rslora, dora, init, lora_dtype)
        raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        nn.init.zeros_(self.lora_B.weight)

    @property
    def is_nf4(self) -> bool:
        return isinstance(self.weight, NF4Weight)

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense (out, in) base weight in `dtype` (default: the compute dtype); NF4 is dequantized first."""
        w = self.weight.dequantize(self._compute_dtype) if self.is_nf4 else self.weight
        return w if dtype is None else w.to(dtype)

    def delta_weight(self) -> Tensor:
        """scaling * B @ A, (out, in), fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _base_forward(self, x: Tensor) -> Tensor:
        xc = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(xc.dtype)
        y = nf4_linear(xc, self.weight, bias) if self.is_nf4 else F.linear(xc, self.weight, bias)
        return y.to(x.dtype)

    def _base_linear_nobias(self, x: Tensor) -> Tensor:
        if self.is_nf4:
            return nf4_linear(x, self.weight, None, weight_dtype=self._compute_dtype)
        return F.linear(x, self.weight.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        result = self._base_forward(x)
        if self.merged or self.disabled:
            return result
        out_dtype = result.dtype
        xl = x.to(self.lora_A.weight.dtype)
        if not self.use_dora:
            result = result + self.lora_B(self.lora_A(self.dropout(xl))) * self.scaling
        else:
            result = _dora.dora_forward(
                xl,
                result,
                bias=self.bias,
                magnitude=self.lora_magnitude_vector,
                lora_A=self.lora_A,
                lora_B=self.lora_B,
                scaling=self.scaling,
                dropout=self.dropout,
                training=self.training,
                base_weight=self.base_weight,
                base_linear=self._base_linear_nobias,
            )
        return result.to(out_dtype)

    def _check_mergeable(self) -> None:
        if self.is_nf4:
            raise LorafuseError(
                "cannot merge a LoRA update into a 4-bit (NF4) base weight in place: re-quantizing would lose "
                "the update's precision",
                "use lorafuse.merge(base_path, adapter_dir, out_dir), which dequantizes the base, adds the "
                "update in fp32 and saves a 16-bit model (CLI: `lorafuse merge`)",
            )

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s·B@A (DoRA: W <- m/||W + s·B@A|| * (W + s·B@A)), computed in fp32 and cast to W's dtype."""
        self._check_mergeable()
        if self.merged:
            return
        w, delta = self.weight, self.delta_weight().to(self.weight.device)
        if self.use_dora:
            new, self._merged_norm = _dora.merged_weight(w, delta, self.lora_magnitude_vector)
        else:
            new = w.float() + delta
        w.data = new.to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact in fp32; in bf16/fp16 the round trip rounds, as in peft)."""
        self._check_mergeable()
        if not self.merged:
            return
        w, delta = self.weight, self.delta_weight().to(self.weight.device)
        if self.use_dora:
            old = _dora.unmerged_weight(w, delta, self.lora_magnitude_vector, self._merged_norm)
            self._merged_norm = None
        else:
            old = w.float() - delta
        w.data = old.to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        base = (
            f"nf4(blocksize={self.weight.blocksize}, compute_dtype={self.compute_dtype})"
            if self.is_nf4
            else f"dense({self.weight.dtype})"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:.6g}, base={base}, bias={self.bias is not None}, "
            f"rslora={self.use_rslora}, dora={self.use_dora}, merged={self.merged}"
        )

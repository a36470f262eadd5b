"""Streaming NF4 loading of 16-bit safetensors checkpoints (random-init models of any shape: random_init.py).

`load_nf4_streaming(folder, device, compute_dtype)` builds the architecture on the meta device (no memory), swaps
every `nn.Linear` but the output head for an `NF4Linear` placeholder, then reads the checkpoint one shard and one
tensor at a time: a quantized linear's weight goes to `device` in `compute_dtype`, is quantized there and the dense
copy dropped; every other tensor is cast to `compute_dtype` and assigned on `device`. `random_init.random_nf4_model`
places random tensors drawn on the device the same way (`_place`), so a 65B-shape NF4 model needs no 16-bit copy.

Memory argument (n = elements of the tensor in flight, bs = NF4 blocksize, C = `QUANT_CHUNK_ELEMS` = 2^22):

  device  Everything already placed belongs to the final model (NF4 codes + scales, compute-dtype embeddings, norms,
          head); non-quantized tensors are assigned, never copied twice. The tensor in flight adds its compute-dtype
          copy (2n bytes at 16 bits; a blocking CPU->GPU `.to(device, dtype)` casts on the host, so the device never
          holds the checkpoint dtype) and the quantizer's temporaries: `quantize_nf4` keeps at most four fp32-sized
          arrays of its input alive (fp32 copy, padded blocks, scaled values, int32 codes: <= 16 B/element; 11.5
          measured on CUDA), and we feed it chunks of <= C elements, so <= 16 C = 64 MiB, plus the fp32 block scales
          of the whole tensor before double quantization (4 n / bs) and one chunk's packed output. Hence
          peak <= final model + largest tensor in 16-bit + 16 C + 4 n / bs + C / 2; for real models the 16-bit
          tensor (hundreds of MB) dominates.
  host    `safe_open` memory-maps one shard and `get_tensor` returns a view of the mapping: only pages of tensors
          actually read become resident, at most one shard, released when the shard is closed, since nothing we keep
          aliases the mapping (kept tensors are copies). A dtype cast needs a host copy of the tensor; tensors above
          `HOST_STAGING_BYTES` (256 MiB) are cast and sent in row slices. Peak host growth <= one shard + 256 MiB
          (+ one chunk's quantizer temporaries and the model itself when the target is the CPU).

Only plain checkpoints stream: one safetensors file or an index of them, keys equal to the model's state-dict keys.
Anything else raises `StreamUnsupported` (the caller falls back to `from_pretrained`): .bin weights, key renames or
fused conversions that transformers 5 applies (`conversion_mapping`), pre-quantized configs, fp32-kept modules,
buffers we cannot rebuild. Keys that do not match (after known-ignorable ones such as old rotary `inv_freq`) raise a
`ModelError` listing them, before any tensor is read.

Dtype policy: floating tensors are cast to `compute_dtype` (the NF4 weights quantize that cast, as the
`from_pretrained` path does, so the two paths give byte-identical NF4 data); integer buffers keep their dtype.
All parameters are frozen.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lorafuse.errors import LorafuseError, ModelError
from lorafuse.io_errors import reading

QUANT_CHUNK_ELEMS = 1 << 22  # multiple of 2 * every valid blocksize (<= 4096), so chunks split on block borders
HOST_STAGING_BYTES = 256 << 20
# Checkpoint keys that transformers itself drops for any model that has such buffers (old per-layer rotary tables,
# formerly persistent position ids); model-specific ones come from `_keys_to_ignore_on_load_unexpected`.
_IGNORABLE = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


class StreamUnsupported(Exception):
    """This checkpoint or architecture needs transformers' own loading; the message says why."""


def build_meta_model(config, dtype: torch.dtype, attn_implementation=None, trust_remote_code=False):
    """The architecture on the meta device (no storage), parameters declared in `dtype`."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)


def add_nf4_placeholders(model, dtype: torch.dtype, blocksize: int) -> list[str]:
    """Swap every nn.Linear but the output head for an NF4Linear whose NF4Weight is still on meta."""
    from lorafuse.lora.linear import NF4Linear
    from lorafuse.model.load import _parent_of, output_head
    from lorafuse.quant.nf4 import NF4Weight

    head = output_head(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for name in names:
        parent, child = _parent_of(model, name)
        linear = getattr(parent, child)
        meta = torch.empty(0, dtype=torch.uint8, device="meta")
        weight = NF4Weight(packed=meta, absmax=meta, shape=linear.weight.shape, dtype=dtype, blocksize=blocksize)
        setattr(parent, child, NF4Linear(weight, linear.bias, compute_dtype=dtype))
    return names


def materialize_buffers(model, device, persistent: bool = False) -> None:
    """Give buffers that are still on meta (non-persistent ones; all of them with persistent=True) real values.

    As transformers does after loading: allocate on `device` and run the model's `_init_weights` on the owning
    module (rotary tables, Gemma's embed_scale are computed there from the config). Parameters may still be on
    meta; init ops on meta tensors are no-ops. A buffer `_init_weights` leaves unset is rebuilt by constructing a
    fresh module from its config; failing both raises StreamUnsupported.
    """
    for module in model.modules():
        names = [
            n
            for n, b in module.named_buffers(recurse=False)
            if b.is_meta and (persistent or n in module._non_persistent_buffers_set)
        ]
        if not names:
            continue
        for n in names:  # a sentinel survives only where nothing wrote the buffer
            b = module._buffers[n]
            fill = _sentinel(b.dtype)
            module._buffers[n] = torch.full(b.shape, 0 if fill is None else fill, dtype=b.dtype, device=device)
        if hasattr(model, "_init_weights"):
            try:
                with torch.no_grad():
                    model._init_weights(module)
            except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
                pass  # an init that cannot run on a meta module leaves the sentinels, so the rebuild below runs
        if any(_unset(module._buffers[n]) for n in names):
            _rebuild_buffers(module, names, device)


def _sentinel(dtype: torch.dtype):
    """NaN for floats, the minimum for integers; None (cannot tell set from unset) for bool/complex."""
    if dtype.is_floating_point:
        return float("nan")
    return None if dtype == torch.bool or dtype.is_complex else torch.iinfo(dtype).min


def _unset(b: torch.Tensor) -> bool:
    fill = _sentinel(b.dtype)
    if fill is None:
        return True
    return bool(b.isnan().any()) if b.is_floating_point() else bool((b == fill).any())


def _rebuild_buffers(module, names, device) -> None:
    try:
        with torch.device(device):
            fresh = type(module)(module.config)
    except (AttributeError, TypeError) as exc:
        raise StreamUnsupported(f"cannot compute the buffers {names} of {type(module).__name__} ({exc})") from None
    for n in names:
        module._buffers[n] = getattr(fresh, n)
    if hasattr(fresh, "attention_scaling"):
        module.attention_scaling = fresh.attention_scaling


def _finish(model) -> None:
    """Re-tie shared weights (the assigned embedding replaced the meta one), check nothing is left on meta, freeze."""
    from lorafuse.quant.nf4 import NF4Weight

    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    left += [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), NF4Weight) and m.weight.packed.is_meta
    ]
    if left:
        raise ModelError(
            f"after loading, these tensors have no values: {left[:8]}",
            "the checkpoint misses them; re-save the model with save_pretrained, or load it with "
            "quant='none' to let transformers initialise them",
        )
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


# ------------------------------------------------------------------------------------------------ quantization


def quantize_chunked(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, chunk_elems: int = QUANT_CHUNK_ELEMS
):
    """`quantize_nf4(w)` with bounded temporaries: byte-identical, computed `chunk_elems` elements at a time.

    NF4 blocks are independent, so chunks aligned to 2 * blocksize give the same codes and scales as the whole
    tensor; the double quantization (offset = mean of ALL block scales) runs once on the assembled scales.
    """
    from lorafuse.quant.nf4 import NF4Weight, check_blocksize, quantize_nf4

    n = w.numel()
    if n <= chunk_elems:
        return quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    check_blocksize(blocksize)
    if chunk_elems % (2 * blocksize):
        raise ValueError(f"chunk_elems={chunk_elems} must be a multiple of 2 * blocksize ({2 * blocksize})")
    flat = w.reshape(-1)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    for start in range(0, n, chunk_elems):
        part = quantize_nf4(flat[start : start + chunk_elems], blocksize=blocksize, double_quant=False)
        packed[start // 2 : start // 2 + part.packed.numel()] = part.packed
        absmax[start // blocksize : start // blocksize + part.absmax.numel()] = part.absmax
        del part
    q = NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        _double_quantize(q)
    return q


def _double_quantize(q) -> None:
    """quantize_nf4's second stage on assembled fp32 scales (8-bit dynamic map, 256-blocks, mean offset)."""
    # The blockwise coder is private to nf4.py; reusing it keeps one implementation of bnb's rounding rules.
    from lorafuse.quant.nf4 import DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE, _blockwise_codes

    absmax = q.absmax
    offset = absmax.mean()
    code = DYNAMIC_MAP_SIGNED.to(absmax.device)
    codes, nested_absmax = _blockwise_codes(absmax - offset, code, NESTED_BLOCKSIZE)
    q.absmax = codes[: absmax.numel()].to(torch.uint8)
    q.nested_absmax, q.nested_code, q.offset = nested_absmax, code, offset.item()


def _resolve_device(device) -> torch.device:
    """An explicit device (cuda -> cuda:<current>) so tensor.device comparisons are exact."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An owned copy of `t` on `device` in `dtype`; big casts go in row slices so the host cast copy stays small."""
    if t.dtype == dtype or t.dim() == 0 or t.numel() * dtype.itemsize <= HOST_STAGING_BYTES:
        return t.to(device=device, dtype=dtype, copy=True)
    out = torch.empty(t.shape, dtype=dtype, device=device)
    rows = max(1, HOST_STAGING_BYTES // max(1, t[0].numel() * dtype.itemsize))
    for i in range(0, t.shape[0], rows):
        out[i : i + rows].copy_(t[i : i + rows])
    return out


def _place(model, key: str, value: torch.Tensor, device, dtype, double_quant, chunk_elems, owned=False) -> None:
    """Put one checkpoint (or random) tensor into the model: quantize NF4 weights, assign everything else.

    owned: `value` is ours to keep (not a view of a mapped checkpoint), so it is used as is when it already has the
    right device and dtype.
    """
    from lorafuse.lora.linear import NF4Linear

    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    target = dtype if value.is_floating_point() else value.dtype
    same = value.device == device and value.dtype == target
    if isinstance(module, NF4Linear) and attr == "weight":
        # Quantizing only reads the input, so a mapped checkpoint tensor needs no copy when device and dtype match.
        dense = value if same else _to_device(value, device, target)
        try:
            module.weight = quantize_chunked(dense, module.weight.blocksize, double_quant, chunk_elems)
        except LorafuseError as exc:
            raise ModelError(f"{key}: {exc.problem}", exc.fix) from None
        return
    kept = value if (owned and same) else _to_device(value, device, target)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(kept, requires_grad=False)
    else:
        module._buffers[attr] = kept


# ------------------------------------------------------------------------------------------- checkpoint reading


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (index order), or StreamUnsupported when it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise StreamUnsupported(f"{folder} has no model.safetensors (or index); other weight formats load whole")


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (file, shape), from the safetensors headers only (no tensor data is read)."""
    from safetensors import safe_open

    keys: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        if not path.is_file():
            raise ModelError(
                f"{path.name} is listed in the checkpoint index but missing from {path.parent}",
                "download the missing shard (or re-save the model with save_pretrained)",
            )
        with reading(path, "the model weights", ModelError, fix="download the shard again"):
            f = safe_open(str(path), framework="pt", device="cpu")  # a corrupt header fails here, named
        with f:
            fmt = (f.metadata() or {}).get("format", "pt")
            if fmt not in ("pt", None):
                raise StreamUnsupported(f"{path.name} was written by {fmt}, not PyTorch")
            for k in f.keys():
                keys.setdefault(k, (path, tuple(f.get_slice(k).get_shape())))
    return keys


def _renamed_key(model, meta_keys, ckpt_keys) -> str | None:
    """A checkpoint key transformers 5 would rename or convert on load (then we fall back), else None."""
    if getattr(model, "_checkpoint_conversion_mapping", None):
        return "the model class declares _checkpoint_conversion_mapping"
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # a transformers without the key-mapping machinery: keys are taken as written
        return None
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = dict.fromkeys(meta_keys, True)
    for key in ckpt_keys:
        new, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if new != key or converter is not None:
            return f"checkpoint key {key!r} becomes {new!r} through transformers' conversion mapping"
    return None


def _plan(model, ckpt: dict, folder: Path) -> set[str]:
    """Which checkpoint keys to load; raise on missing/unexpected keys and shape mismatches before any read."""
    meta_sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reason = _renamed_key(model, meta_sd, ckpt)
    if reason:
        raise StreamUnsupported(reason)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    expected = set(meta_sd) - tied
    patterns = [*(model._keys_to_ignore_on_load_unexpected or ()), *_IGNORABLE]
    unexpected = sorted(
        k for k in ckpt if k not in expected and k not in tied and not any(re.search(p, k) for p in patterns)
    )
    missing = sorted(expected - set(ckpt))
    if missing and any(re.search(p, k) for p in (model._keys_to_ignore_on_load_missing or ()) for k in missing):
        raise StreamUnsupported("the checkpoint omits keys the model initialises itself")
    if missing or unexpected:
        raise ModelError(
            f"the weights in {folder} do not match its config.json ({type(model).__name__}): "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}",
            "make config.json and the *.safetensors files come from the same model (re-download or re-save it)",
        )
    wrong = [f"{k}: {ckpt[k][1]} vs {meta_sd[k]}" for k in sorted(expected) if ckpt[k][1] != meta_sd[k]]
    if wrong:
        raise ModelError(
            f"tensor shapes in {folder} differ from what config.json implies (checkpoint vs model): {wrong[:6]}",
            "use the config.json that belongs to these weights",
        )
    return expected


def load_nf4_streaming(
    folder,
    device,
    compute_dtype: torch.dtype,
    blocksize: int = 64,
    double_quant: bool = True,
    attn_implementation=None,
    trust_remote_code: bool = False,
    chunk_elems: int = QUANT_CHUNK_ELEMS,
):
    """Load a 16-bit safetensors model folder as NF4 on `device`, tensor by tensor (see the module docstring)."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    folder, device = Path(folder), _resolve_device(device)
    files = checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise StreamUnsupported("config.json has a quantization_config (a pre-quantized checkpoint)")
    model = build_meta_model(config, compute_dtype, attn_implementation, trust_remote_code)
    if compute_dtype != torch.float32 and (
        model._keep_in_fp32_modules or getattr(model, "_keep_in_fp32_modules_strict", None)
    ):
        raise StreamUnsupported(f"{type(model).__name__} keeps some modules in fp32")
    to_load = _plan(model, _read_headers(files), folder)
    materialize_buffers(model, device)
    add_nf4_placeholders(model, compute_dtype, blocksize)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in to_load:
                    _place(model, key, f.get_tensor(key), device, compute_dtype, double_quant, chunk_elems)
                    to_load.discard(key)
    _finish(model)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model

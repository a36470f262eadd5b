"""bitsandbytes' 4-bit (nf4) storage: one weight's keys (`bnb_state_dict`, `from_bnb_state_dict`), and whole
transformers + bitsandbytes checkpoint folders, read and written.

Layout (transformers 5.x `save_pretrained` of a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`):

    config.json          the model config plus "dtype" and the `quantization_config` block (QUANTIZATION_CONFIG)
    model.safetensors    (or shards listed in model.safetensors.index.json), metadata {"format": "pt"}; for every
                         quantized Linear <m> the six keys of bnb_state_dict(weight, "<m>."):
        <m>.weight                                uint8 ((n+1)//2, 1)   packed codes
        <m>.weight.absmax                         uint8 (n_blocks,) with double quant, else fp32
        <m>.weight.quant_map                      fp32 (16,)
        <m>.weight.nested_absmax                  fp32 (ceil(n_blocks/256),)   double quant only
        <m>.weight.nested_quant_map               fp32 (256,)                  double quant only
        <m>.weight.quant_state.bitsandbytes__nf4  uint8 JSON bytes {"quant_type", "blocksize", "dtype", "shape", ...}
                         and every other tensor (embeddings, norms, biases, lm_head) dense, in the model dtype.

transformers quantizes every nn.Linear except the output head (and `llm_int8_skip_modules`), and on load expects
the six keys for exactly those modules; `write_bnb_4bit_folder` callers must quantize that same set.
Writes are atomic: everything goes to a temporary folder beside the target, is fsynced, then renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafuse.atomic import fsync_path, fsync_tree
from lorafuse.errors import ModelError
from lorafuse.quant.nf4 import DTYPES, NESTED_BLOCKSIZE, VALID_BLOCKSIZES, NF4Weight

_BLOB_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
_FP4_BLOB_SUFFIX = ".weight.quant_state.bitsandbytes__fp4"


def quantization_config(compute_dtype: torch.dtype, double_quant: bool) -> dict:
    """The `quantization_config` block transformers 5.x writes for nf4 (BitsAndBytesConfig.to_dict())."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _quant_state_json(w: NF4Weight) -> dict:
    # Key order and value forms of bnb's QuantState.as_dict(packed=True) non-tensor items.
    state = {
        "quant_type": "nf4",
        "blocksize": w.blocksize,
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": list(w.shape),
    }
    if w.double_quant:
        state.update(nested_blocksize=w.nested_blocksize, nested_dtype="float32", nested_offset=w.offset)
    return state


def bnb_state_dict(w: NF4Weight, prefix: str) -> dict[str, torch.Tensor]:
    """`w` as bitsandbytes' serialized keys under `prefix` (e.g. "model.layers.0.mlp.up_proj."), as Linear4bit writes.

    Tables are cloned so no two entries share storage (safetensors refuses shared tensors).
    """
    blob = json.dumps(_quant_state_json(w)).encode("utf-8")
    sd = {
        prefix + "weight": w.packed.view(-1, 1),
        prefix + "weight.absmax": w.absmax,
        prefix + "weight.quant_map": w.code.clone(),
    }
    if w.double_quant:
        sd[prefix + "weight.nested_absmax"] = w.nested_absmax
        sd[prefix + "weight.nested_quant_map"] = w.nested_code.clone()
    sd[prefix + "weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8, device=w.device)
    return sd


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> NF4Weight:
    """The NF4Weight stored as bitsandbytes' keys under `prefix`; `sd` is not modified. Tensors keep their device.

    The stored `quant_map` is not read: bitsandbytes itself decodes nf4 with its fixed table (NF4_CODE).
    """
    state = _read_quant_state_json(sd, prefix)
    shape = torch.Size(state["shape"])
    n = math.prod(shape)
    blocksize = int(state["blocksize"])
    if blocksize not in VALID_BLOCKSIZES:
        raise ModelError(
            f"{prefix}weight has NF4 blocksize {blocksize}, which bitsandbytes cannot produce",
            "re-quantize the model from its 16-bit weights",
        )
    # Non-uint8 quant_storage (e.g. bf16 for FSDP) holds the same bytes; view them as uint8.
    packed = _require(sd, prefix, "weight").contiguous().view(-1).view(torch.uint8)[: (n + 1) // 2]
    nested = "nested_offset" in state
    weight = NF4Weight(
        packed=packed,
        absmax=_require(sd, prefix, "weight.absmax"),
        shape=shape,
        dtype=DTYPES[state["dtype"]],
        blocksize=blocksize,
        nested_absmax=_require(sd, prefix, "weight.nested_absmax") if nested else None,
        nested_code=_require(sd, prefix, "weight.nested_quant_map") if nested else None,
        offset=float(state["nested_offset"]) if nested else None,
        nested_blocksize=int(state.get("nested_blocksize", NESTED_BLOCKSIZE)),
    )
    _check_sizes(weight, prefix)
    return weight


def _require(sd: dict, prefix: str, suffix: str) -> torch.Tensor:
    key = prefix + suffix
    if key not in sd:
        found = sorted(k for k in sd if k.startswith(prefix))
        raise ModelError(
            f"bitsandbytes 4-bit key {key!r} is missing (keys under {prefix!r}: {found})",
            "the checkpoint is incomplete or not a bitsandbytes nf4 checkpoint; re-save it with "
            "transformers' save_pretrained or re-quantize from the 16-bit model",
        )
    return sd[key]


def _read_quant_state_json(sd: dict, prefix: str) -> dict:
    key = prefix + "weight.quant_state.bitsandbytes__nf4"
    if key not in sd and prefix + "weight.quant_state.bitsandbytes__fp4" in sd:
        raise ModelError(
            f"{prefix}weight is quantized as fp4; lorafuse reads nf4 only",
            "quantize the 16-bit model with bnb_4bit_quant_type='nf4' (or let lorafuse quantize it)",
        )
    blob = _require(sd, prefix, "weight.quant_state.bitsandbytes__nf4")
    state = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    if state.get("quant_type") != "nf4" or state.get("dtype") not in DTYPES:
        raise ModelError(
            f"{key} describes quant_type={state.get('quant_type')!r}, dtype={state.get('dtype')!r}; "
            f"lorafuse reads nf4 weights of dtype {list(DTYPES)}",
            "re-quantize the model from its 16-bit weights with nf4",
        )
    return state


def _check_sizes(w: NF4Weight, prefix: str) -> None:
    n_blocks = -(-w.numel // w.blocksize)
    expect = {"weight": ((w.numel + 1) // 2, w.packed.numel()), "weight.absmax": (n_blocks, w.absmax.numel())}
    if w.double_quant:
        expect["weight.nested_absmax"] = (-(-n_blocks // w.nested_blocksize), w.nested_absmax.numel())
        expect["weight.nested_quant_map"] = (256, w.nested_code.numel())
    for key, (want, got) in expect.items():
        if want != got:
            raise ModelError(
                f"{prefix}{key} has {got} elements but shape {list(w.shape)} with blocksize {w.blocksize} needs {want}",
                "the checkpoint is corrupt or was written by an incompatible tool; re-save it",
            )


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} has no config.json", "point to a Hugging Face model folder (config.json + weights)")
    return json.loads(path.read_text(encoding="utf-8"))


def is_bnb_4bit_checkpoint(folder: str | Path) -> bool:
    """True when config.json marks the folder as bitsandbytes-quantized.

    8-bit and fp4 folders also answer True, so that `read_bnb_4bit_state` reports clearly what it cannot read.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    qc = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes"


def _check_supported(folder: Path, qc: dict) -> None:
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ModelError(
            f"{folder} is a bitsandbytes 8-bit (LLM.int8) checkpoint; lorafuse reads 4-bit nf4 only",
            "load the original 16-bit model instead (lorafuse quantizes it to nf4 on load)",
        )
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default is fp4
    if quant_type != "nf4":
        raise ModelError(
            f"{folder} is quantized with bitsandbytes {quant_type!r}; lorafuse reads nf4 only",
            "load the original 16-bit model instead, or a checkpoint saved with bnb_4bit_quant_type='nf4'",
        )


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(
                f"{folder}: shards {missing} listed in model.safetensors.index.json are missing",
                "download the checkpoint again; every shard in the index must be present",
            )
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ModelError(
        f"{folder} has no model.safetensors or model.safetensors.index.json",
        "bitsandbytes 4-bit checkpoints are read from safetensors files; re-save the model with "
        "save_pretrained (safe_serialization is the default)",
    )


def read_bnb_4bit_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, NF4Weight], dict]:
    """Read a transformers+bitsandbytes nf4 folder on CPU.

    Returns (dense_state_dict, {module_name: NF4Weight}, quantization_config). Module names are state-dict
    prefixes without the trailing dot, e.g. "model.layers.0.self_attn.q_proj".
    """
    folder = Path(folder)
    qc = _read_config(folder).get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes":
        raise ModelError(
            f"{folder}/config.json has no bitsandbytes quantization_config",
            "this is not a bitsandbytes checkpoint; load it as a dense model",
        )
    _check_supported(folder, qc)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    fp4 = [k for k in state if k.endswith(_FP4_BLOB_SUFFIX)]
    if fp4:
        raise ModelError(
            f"{folder}: {len(fp4)} weights are quantized as fp4 (e.g. {fp4[0]}); lorafuse reads nf4 only",
            "load the original 16-bit model instead",
        )
    quantized: dict[str, NF4Weight] = {}
    for key in [k for k in state if k.endswith(_BLOB_SUFFIX)]:
        module = key[: -len(_BLOB_SUFFIX)]
        quantized[module] = from_bnb_state_dict(state, module + ".")
    for module in quantized:
        weight_key = module + ".weight"
        for key in [k for k in state if k == weight_key or k.startswith(weight_key + ".")]:
            del state[key]
    orphans = [k for k in state if k.endswith((".weight.absmax", ".weight.quant_map", ".weight.nested_absmax"))]
    if orphans:
        raise ModelError(
            f"{folder}: quantization tensors without their quant_state entry, e.g. {orphans[0]}",
            "the checkpoint is incomplete; download or re-save it",
        )
    return state, quantized, qc


def _model_dtype(quantized: dict[str, NF4Weight]) -> torch.dtype | None:
    dtypes = {w.dtype for w in quantized.values()}
    if len(dtypes) > 1:
        raise ValueError(
            f"quantized weights have mixed original dtypes {sorted(map(str, dtypes))}; "
            "transformers keeps one model dtype"
        )
    return dtypes.pop() if dtypes else None


def _config_dict(config, quantized: dict[str, NF4Weight], compute_dtype: torch.dtype) -> dict:
    # A transformers PretrainedConfig is written as save_pretrained does (only non-default values).
    data = dict(config.to_diff_dict() if hasattr(config, "to_diff_dict") else config)
    data.pop("torch_dtype", None)
    dtype = _model_dtype(quantized)
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    data["quantization_config"] = quantization_config(
        compute_dtype, double_quant=bool(quantized) and all(w.double_quant for w in quantized.values())
    )
    return data


def write_bnb_4bit_folder(
    folder: str | Path,
    config,
    dense_state_dict: dict[str, torch.Tensor],
    quantized: dict[str, NF4Weight],
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a folder transformers+bitsandbytes load as a pre-quantized nf4 model.

    config: a transformers PretrainedConfig or a config.json dict. dense_state_dict: every tensor that is not
    quantized (one entry per storage: drop lm_head.weight when it is tied to the embeddings). quantized:
    {module_name: NF4Weight}. compute_dtype: bnb_4bit_compute_dtype. Refuses to overwrite a non-empty folder.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ModelError(
            f"{folder} already exists and is not empty; refusing to overwrite it",
            "choose a new output folder or delete the existing one",
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in dense_state_dict.items()}
    for module, weight in quantized.items():
        for key, value in bnb_state_dict(weight, module + ".").items():
            if key in tensors:
                raise ValueError(f"{key} is both in dense_state_dict and produced by quantized[{module!r}]")
            tensors[key] = value.cpu().contiguous()
    config_text = json.dumps(_config_dict(config, quantized, compute_dtype), indent=2, sort_keys=True) + "\n"

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the final folder
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(config_text, encoding="utf-8")
        fsync_tree(tmp)
        if folder.exists():
            folder.rmdir()  # empty (checked above); rename cannot replace a directory
        os.rename(tmp, folder)
        fsync_path(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder

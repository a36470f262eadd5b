"""Read and write transformers + bitsandbytes 4-bit (nf4) checkpoint folders.

Layout (transformers 5.x `save_pretrained` of a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`):

    config.json          the model config plus "dtype" and the `quantization_config` block (QUANTIZATION_CONFIG)
    model.safetensors    (or shards listed in model.safetensors.index.json), metadata {"format": "pt"}; for every
                         quantized Linear <m> the six keys of NF4Weight.bnb_state_dict("<m>."):
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
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafuse.atomic import fsync_path, fsync_tree
from lorafuse.errors import ModelError
from lorafuse.quant.nf4 import NF4Weight

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
        quantized[module] = NF4Weight.from_bnb_state_dict(state, module + ".")
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
        for key, value in weight.bnb_state_dict(module + ".").items():
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

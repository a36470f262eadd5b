"""Load a causal LM and its tokenizer, optionally with an NF4 4-bit base.

`load_model(path, quant="nf4")` reads any `AutoModelForCausalLM` architecture from a local folder (offline) or a hub
id (when the network allows), in `compute_dtype`, then replaces every `nn.Linear` except the output head with an
`NF4Linear` (bitsandbytes-compatible NF4, blocksize 64, double quantization by default), one layer at a time, on the
target device. A local folder of 16-bit safetensors streams tensor by tensor instead (`lorafuse.model.stream`: the
dense model is never whole in memory); checkpoints it cannot handle (.bin, renamed keys) take the path above. A
folder that transformers + bitsandbytes saved in 4-bit is read directly (no re-quantization).

Dtype policy: `compute_dtype` is the dtype of the forward/backward math and of every parameter that is not quantized
(embeddings, norms, head). LoRA weights are created in fp32 by `apply_lora` (the optimizer updates fp32 masters; the
adapter math runs in fp32 and is cast back, as peft does). "auto" picks bf16 where the GPU supports it, fp16 on
pre-Ampere GPUs (a T4), and fp32 on a CPU.

`"builtin:tiny-llama"` is a tiny random-init Llama with its own tokenizer trained on the bundled demo data (its recipe:
lorafuse.builtin), built on the first use into a cache folder (`$LORAFUSE_CACHE`, default ~/.cache/lorafuse); the demo
and tests use it offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lorafuse import builtin
from lorafuse.errors import ModelError
from lorafuse.model_state import model_state

BUILTIN_PREFIX = builtin.PREFIX
_BUILTIN_VERSION = "v2"  # v2: the tokenizer's merges stay within runs of one script


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFUSE_CACHE", Path.home() / ".cache" / "lorafuse"))


def resolve_model_path(path_or_id: str) -> str:
    """Turn a builtin name into its (built-on-demand) folder; check local folders; leave hub ids alone."""
    path_or_id = str(path_or_id)
    if path_or_id.startswith(BUILTIN_PREFIX):
        return str(_builtin_folder(path_or_id[len(BUILTIN_PREFIX) :]))
    p = Path(path_or_id).expanduser()
    looks_local = p.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1
    if not looks_local:  # a hub id such as "meta-llama/Llama-2-7b-hf"; offline: its folder in the HF cache
        from lorafuse.hub import hub_source

        return hub_source(path_or_id)
    if p.is_file():
        raise ModelError(
            f"model.path {path_or_id} is a file, not a model folder",
            "point model.path at the folder that holds it (config.json + *.safetensors + tokenizer files)",
        )
    if not p.is_dir():
        raise ModelError(
            f"model folder not found: {path_or_id} (working directory {Path.cwd()})",
            "pass a folder that holds config.json and the weights, a hub id like 'meta-llama/Llama-2-7b-hf', "
            "or 'builtin:tiny-llama' for the offline demo model",
        )
    if not (p / "config.json").is_file():
        raise ModelError(
            f"{p} has no config.json, so it is not a transformers model folder",
            "point model.path at the folder that `save_pretrained` wrote (config.json + *.safetensors)",
        )
    from lorafuse.model.checks import check_config_json

    check_config_json(p)  # a corrupt config.json is named as such, not as "no usable tokenizer"
    return str(p)


def _builtin_folder(name: str) -> Path:
    if name not in builtin.MODELS:
        raise ModelError(
            f"unknown builtin model 'builtin:{name}'",
            f"available: {', '.join(BUILTIN_PREFIX + n for n in builtin.MODELS)}",
        )
    corpus = builtin.demo_corpus()
    # The folder name carries a hash of what the tokenizer is trained on, so a changed demo data set or model
    # recipe never reuses a stale cached model.
    digest = hashlib.sha256(json.dumps([_BUILTIN_VERSION, builtin.MODELS[name], corpus]).encode()).hexdigest()[:10]
    folder = cache_dir() / "builtin" / f"{name}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    from lorafuse.model.tiny import build_tiny_model, build_tiny_tokenizer

    arch, kwargs = builtin.MODELS[name]
    tok = build_tiny_tokenizer(corpus, vocab_size=builtin.VOCAB_SIZE, split_scripts=True)
    model = build_tiny_model(arch, tokenizer=tok, **kwargs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def default_device() -> torch.device:
    """This process's GPU (`cuda:LOCAL_RANK` under torchrun), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_compute_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype for `device`: bf16 where supported, fp16 on pre-Ampere GPUs, fp32 on CPU.

    An explicit bf16 on a GPU without bf16 support raises with the fix (use float16).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str) and dtype != "auto":
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ModelError(f"unknown compute dtype {dtype!r}", "use auto, bfloat16, float16 or float32")
        dtype = getattr(torch, dtype)
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ModelError(
            f"bfloat16 was asked for, but {name} does not support it",
            "set model.compute_dtype: float16 (or auto, which picks float16 on this GPU)",
        )
    return dtype


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token set and right padding (for training).

    The pad token is chosen distinct from EOS where the vocabulary allows (UNK, or a reserved pad token); lorafuse pads
    labels with -100 directly, so even pad == EOS can never mask EOS, but a distinct pad keeps attention masks clean.
    """
    from transformers import AutoTokenizer

    folder = resolve_model_path(path)
    from lorafuse.model.checks import check_tokenizer_files

    check_tokenizer_files(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        if "trust_remote_code" in str(exc):
            from lorafuse.model.checks import remote_code_error

            raise remote_code_error(folder) from None
        raise ModelError(
            f"no usable tokenizer in {path}: {str(exc).splitlines()[0]}",
            "copy the tokenizer files (tokenizer.json, tokenizer_config.json) of the base model into that folder",
        ) from None
    if tok.pad_token is None:
        for candidate in ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", tok.unk_token):
            if candidate and candidate in tok.get_vocab() and candidate != tok.eos_token:
                tok.pad_token = candidate
                break
        else:
            tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(
    path_or_hub_id: str,
    quant: str = "nf4",
    compute_dtype: str | torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """Load `(model, tokenizer)`; with quant="nf4" every linear but the output head is NF4 4-bit.

    compute_dtype: dtype of the math and of the non-quantized parameters (embeddings, norms, head); "auto" picks per
    device. LoRA weights added later by `apply_lora` are fp32. The model is frozen and in eval mode. A merged model's
    folder holds the lorafuse.json of its adapter: its prompt format goes on `model_state(model).prompt`.
    """
    if quant not in ("nf4", "none"):
        raise ModelError(f"unknown quant {quant!r}", "use quant='nf4' (QLoRA) or quant='none' (LoRA on a 16-bit base)")
    device = torch.device(device or default_device())
    dtype = resolve_compute_dtype(compute_dtype, device)
    folder = resolve_model_path(path_or_hub_id)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    from lorafuse.model.checks import check_attn_implementation, model_code_errors

    check_attn_implementation(attn_implementation)
    with model_code_errors(folder, attn_implementation), _weights_errors(folder):
        model, quant_info = _load_weights(
            folder, quant, dtype, device, blocksize, double_quant, attn_implementation, trust_remote_code
        )
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model_state(model).base = {
        "name_or_path": str(path_or_hub_id),
        "folder": folder,
        "compute_dtype": str(dtype).removeprefix("torch."),
        **quant_info,
    }
    from lorafuse.model.prompt_format import read_prompt_format

    model_state(model).prompt = read_prompt_format(folder, tokenizer_fallback=False)  # a merged model's lorafuse.json
    return model, tokenizer


def _weights_errors(folder):
    """A corrupt or truncated weights file as a ModelError naming it (the folder when there are several)."""
    from lorafuse.io_errors import reading

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    label = files[0] if len(files) == 1 else f"in {folder}"
    return reading(label, "the model weights", ModelError, fix="download or save the model again")


def _load_weights(folder, quant, dtype, device, blocksize, double_quant, attn_implementation, trust_remote_code):
    """(model, quant facts): a bnb 4-bit folder as it is, else streamed NF4, else from_pretrained (+ NF4)."""
    from lorafuse.quant.bnb_format import is_bnb_4bit_checkpoint

    if Path(folder).is_dir() and is_bnb_4bit_checkpoint(folder):
        model = _load_bnb_4bit(folder, dtype, device, attn_implementation, trust_remote_code)
        quant_info = {"quant": "nf4", "prequantized": True}
    else:
        model = (
            _load_streaming(folder, device, dtype, blocksize, double_quant, attn_implementation, trust_remote_code)
            if quant == "nf4" and Path(folder).is_dir()
            else None
        )
        loader = "from_pretrained" if model is None else "stream"
        if model is None:
            model = _load_dense(folder, dtype, attn_implementation, trust_remote_code)
            if quant == "nf4":
                quantize_linears(model, device, dtype, blocksize=blocksize, double_quant=double_quant)
            model.to(device)
        quant_info = (
            {"quant": quant, "blocksize": blocksize, "double_quant": double_quant, "loader": loader}
            if quant == "nf4"
            else {"quant": "none"}
        )
    return model, quant_info


def _load_streaming(folder, device, dtype, blocksize, double_quant, attn_implementation, trust_remote_code):
    """NF4 straight from safetensors shards, tensor by tensor (lorafuse.model.stream); None when it cannot."""
    from lorafuse.model.stream import StreamUnsupported, load_nf4_streaming

    try:
        return load_nf4_streaming(
            folder,
            device,
            dtype,
            blocksize=blocksize,
            double_quant=double_quant,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except StreamUnsupported as why:
        # from_pretrained holds the whole dense model in host memory before quantizing: say why we went there.
        logging.getLogger(__name__).info("loading %s through from_pretrained: %s", folder, why)
        return None


def _load_dense(folder: str, dtype: torch.dtype, attn_implementation, trust_remote_code):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"could not load the model {folder}: {str(exc).splitlines()[0]}",
            "check the id or folder; offline, download it first (huggingface-cli download ID --local-dir DIR) "
            "and set model.path to that folder",
        ) from None


def output_head(model) -> nn.Module | None:
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def quantize_linears(model, device, dtype, blocksize=64, double_quant=True) -> int:
    """Replace every nn.Linear except the output head by an NF4Linear on `device`, layer by layer.

    Each dense weight is moved to `device`, quantized there and dropped, so device memory holds the NF4 model plus one
    dense weight at a time. Returns how many linears were quantized.
    """
    from lorafuse.lora.linear import NF4Linear

    head = output_head(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for name in names:
        parent, child = _parent_of(model, name)
        linear = getattr(parent, child)
        linear.to(device)
        setattr(
            parent,
            child,
            NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype),
        )
        linear.to("meta")  # free the dense copy now, not at the end
    return len(names)


def _parent_of(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _load_bnb_4bit(folder, dtype, device, attn_implementation, trust_remote_code):
    """Build the architecture on the meta device, then fill it from a transformers+bitsandbytes 4-bit folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafuse.lora.linear import NF4Linear
    from lorafuse.quant.bnb_format import read_bnb_4bit_state

    dense_sd, quantized, _ = read_bnb_4bit_state(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    for name, q in quantized.items():
        parent, child = _parent_of(model, name)
        bias = dense_sd.pop(f"{name}.bias", None)
        setattr(
            parent,
            child,
            NF4Linear(q.to(device), bias=None if bias is None else bias.to(device, dtype), compute_dtype=dtype),
        )
    dense_sd = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in dense_sd.items()}
    missing, unexpected = model.load_state_dict(dense_sd, strict=False, assign=True)
    missing = [k for k in missing if not _is_nf4_key(model, k)]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise ModelError(
            f"the 4-bit checkpoint in {folder} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}",
            "re-save it with transformers + bitsandbytes, or load the 16-bit original with quant=nf4",
        )
    _materialize_buffers(model, device)
    return model


def _is_nf4_key(model, key: str) -> bool:
    from lorafuse.lora.linear import NF4Linear

    module_name = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(module_name), NF4Linear)
    except AttributeError:
        return False


def _materialize_buffers(model, device):
    """Non-saved buffers (e.g. rotary inv_freq) are still on meta after assign-loading: rebuild their module.

    Modules that own such buffers (rotary embeddings) are built from the config alone, so a fresh instance on the
    target device gives the right values without touching any weight.
    """
    for module in model.modules():
        meta = [name for name, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        try:
            with torch.device(device):
                fresh = type(module)(module.config)
        except (AttributeError, TypeError) as exc:
            raise ModelError(
                f"cannot rebuild the non-saved buffers {meta} of {type(module).__name__} ({exc})",
                "load the 16-bit original with quant=nf4 instead of the 4-bit folder",
            ) from None
        for name in meta:
            setattr(module, name, getattr(fresh, name))
        for attr in ("attention_scaling",):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))

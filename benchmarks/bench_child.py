"""The benchmark harness's child processes (benchmarks/bench.py): each runner and the model build run in a fresh
process, which answers on a stdout line `BENCH_RESULT <json>`, `BENCH_PROBE <json>` or `BENCH_UNAVAILABLE <reason>`
(the last such line counts).

`build_in_child` builds (or finds, by its bench-shape.json marker) the random-init checkpoint folder of a shape in
such a child, on the device, and returns the card and library versions the child saw; with --random-init it only
probes the device, and each runner generates the model itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.plan.memory import GIB
from lorafuse.plan.shapes import builtin_shape

ROOT = Path(__file__).resolve().parents[1]


def _child_env() -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in [env.get("PYTHONPATH")] if x])
    return env


def run_child(cmd: list[str], timeout: int) -> tuple[dict, str]:
    """Run a child; return ({"kind": BENCH_*, ...payload} or an error dict, stderr tail)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout} s"}, ""
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
    for line in reversed((proc.stdout or "").splitlines()):
        kind, _, payload = line.partition(" ")
        if kind in ("BENCH_RESULT", "BENCH_PROBE"):
            return json.loads(payload), tail
        if kind == "BENCH_UNAVAILABLE":
            return {"status": "unavailable", "reason": payload}, tail
    last = tail.splitlines()[-1] if tail else f"exit status {proc.returncode}"
    return {"status": "error", "reason": f"no result (exit {proc.returncode}): {last[:300]}"}, tail


def build_checkpoint(shape_name: str, folder: str, device: str, dtype: str) -> dict:
    """In the child: a random-init model of `shape_name` made on `device`, saved with a tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafuse.model.tiny import build_tiny_tokenizer

    info = _versions(device)
    target = Path(folder)
    marker = {"shape": shape_name, "config": builtin_shape(shape_name).hf_config(), "dtype": dtype}
    if (target / "bench-shape.json").is_file() and json.loads((target / "bench-shape.json").read_text()) == marker:
        return {**info, "built": False}
    if target.is_dir() and any(target.iterdir()) and not (target / "bench-shape.json").is_file():
        # bench-shape.json marks the folders this builds; any other folder is someone's and is never replaced
        return {"reason": f"{target} holds files the benchmark did not write: pass another --model-dir"}
    cfg = dict(marker["config"])
    tok = build_tiny_tokenizer()  # random token ids are fed directly; the tokenizer only completes the folder
    config = AutoConfig.for_model(cfg.pop("model_type"), pad_token_id=tok.pad_token_id, **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    tok.save_pretrained(tmp)
    (tmp / "bench-shape.json").write_text(json.dumps(marker))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return {**info, "built": True}


def _versions(device: str) -> dict:
    """The card (its name and memory on CUDA) and the library versions this process sees."""
    import torch
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "card": "cpu",
        "memory_gib": None,
    }
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        info.update(card=torch.cuda.get_device_name(), memory_gib=total / GIB)
    return info


def probe_device(device: str) -> dict:
    """In the child: the card and library versions, for --random-init (nothing is built)."""
    return {**_versions(device), "built": False}


def build_in_child(args, folder: Path) -> dict:
    """The card and library versions from a child that builds (or finds) `folder`'s checkpoint of args.shape, or
    with --random-init only looks at the device."""
    spec = json.dumps([args.shape, str(folder), args.device, args.dtype])
    here = f"import json, sys; sys.path[:0] = [{str(Path(__file__).resolve().parent)!r}, {str(ROOT)!r}]; "
    code = here + (
        "from bench_child import build_checkpoint; "
        "print('BENCH_PROBE', json.dumps(build_checkpoint(*json.loads(sys.argv[1]))))"
    )
    if args.random_init:
        spec = json.dumps([args.device])
        code = here + (
            "from bench_child import probe_device; "
            "print('BENCH_PROBE', json.dumps(probe_device(*json.loads(sys.argv[1]))))"
        )
    probe, tail = run_child([sys.executable, "-c", code, spec], timeout=args.timeout)
    if "torch" not in probe:
        raise LorafuseError(
            f"building the {args.shape} checkpoint failed: {probe.get('reason')}\n{tail}",
            "check that torch and transformers work on this machine (python -c 'import torch')",
        )
    return probe

"""Host memory and time of `lorafuse export` (GGUF) against the model's size: the export streams tensor by tensor.

Builds a random-init Llama checkpoint of the given shape (bf16 safetensors, no download) and a LoRA adapter on all
linears (r 16, random non-zero B) trained "on" the dense base and one on its NF4 version, then runs the export in a
fresh process per (training quant, GGUF type) and reports the child's peak RSS, the same process's RSS after only the
imports (the baseline, current RSS), the checkpoint and output sizes and the wall time.

What streaming predicts: anon+ + file+ ~= the loaded base (dense: the bf16 checkpoint, one copy, memory-mapped; NF4:
~0.5 byte/param for the linears + the bf16 embeddings, norms and head) + one fp32 matrix and its encoding (the largest
is the embedding, vocab x hidden). A second full copy of the model would add the checkpoint size (bf16) or twice it
(fp32) to anon+.

    python benchmarks/export_memory.py                                   # ~170M params, a few minutes on 2 cores
    python benchmarks/export_memory.py --hidden 4096 --layers 32 --intermediate 11008 --types q8_0   # 7B shape

Prints a table; appends one JSON line per run to benchmarks/results/export-memory.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, threading, time
from lorafuse.artifacts.export import export
import gguf, torch, transformers  # noqa: F401  (the baseline includes every import the export makes)

def status():
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("Rss")}

base, peak, done = status(), {}, threading.Event()
def sample():  # RssAnon: memory the process allocated; RssFile: mapped file pages (the mmapped checkpoint)
    while not done.is_set():
        for k, v in status().items():
            peak[k] = max(peak.get(k, 0), v)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
result = export(sys.argv[1], sys.argv[2], sys.argv[3], quant=sys.argv[4])
seconds = time.perf_counter() - start
done.set()
print(json.dumps({"seconds": seconds, "out_bytes": result.bytes, "base_anon": base["RssAnon"],
                  "peak_anon": peak["RssAnon"], "base_file": base["RssFile"], "peak_file": peak["RssFile"]}))
"""


def build(folder: Path, args) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafuse.model.tiny import build_tiny_tokenizer

    config = AutoConfig.for_model(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.02)
    model.save_pretrained(folder)
    tokenizer = build_tiny_tokenizer()  # ids < 512; the rest of the embedding exports as [PAD<id>] tokens
    tokenizer.save_pretrained(folder)
    return folder


def adapter(base: Path, out: Path, quant: str) -> Path:
    import torch

    import lorafuse

    model, tok = lorafuse.load_model(str(base), quant=quant, compute_dtype="bfloat16", device="cpu")
    lorafuse.apply_lora(model, r=16, alpha=32, targets="all-linear")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    lorafuse.save_adapter(model, out, tokenizer=tok)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--train-quants", nargs="+", default=["none", "nf4"])
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "export-memory.jsonl"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-memory-") as tmp:
        tmp = Path(tmp)
        base = build(tmp / "base", args)
        ckpt = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        for train_quant in args.train_quants:
            adapter_dir = adapter(base, tmp / f"adapter-{train_quant}", train_quant)
            for gguf_type in args.types:
                out = tmp / f"m-{train_quant}-{gguf_type}.gguf"
                run = [sys.executable, "-c", CHILD, str(base), str(adapter_dir), str(out), gguf_type]
                done = subprocess.run(run, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(train_quant=train_quant, gguf_type=gguf_type, checkpoint_bytes=ckpt, shape=vars(args))
                rows.append(row)
                out.unlink()
    print(
        f"{'trained on':<10} {'type':<6} {'ckpt GiB':>9} {'out GiB':>8} {'anon+ GiB':>10} {'/ckpt':>6} "
        f"{'file+ GiB':>10} {'s':>7}"
    )
    for r in rows:
        anon, file = (r["peak_anon"] - r["base_anon"]) / 2**30, (r["peak_file"] - r["base_file"]) / 2**30
        print(
            f"{r['train_quant']:<10} {r['gguf_type']:<6} {r['checkpoint_bytes'] / 2**30:>9.2f} "
            f"{r['out_bytes'] / 2**30:>8.2f} {anon:>10.2f} {anon * 2**30 / r['checkpoint_bytes']:>6.2f} "
            f"{file:>10.2f} {r['seconds']:>7.1f}"
        )
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        for r in rows:
            f.write(json.dumps(r | {"date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()

"""The run's switches travel one way: YAML -> RunConfig.options() -> accel.prepare -> the fused ops' operands, and the
planner reads the same Options; FP8 is refused, with the fix, where plan/policy.py says it cannot run."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import lorafuse
from lorafuse import accel
from lorafuse.accel.fast_path import FastLoRAMLP, linear_spec
from lorafuse.config import load_config
from lorafuse.errors import LorafuseError
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.options import KernelOptions, Options
from lorafuse.plan import policy
from lorafuse.plan.memory import dequant_bytes
from lorafuse.plan.shapes import builtin_shape
from lorafuse.plan.workload import workload_from_config


def _model(dtype=torch.float32):
    model = build_tiny_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2).to(dtype)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    return model


def _config(tmp_path, train: str):
    (tmp_path / "c.yaml").write_text(
        f'model: {{path: "builtin:tiny-llama"}}\ndata: {{path: "builtin:demo"}}\ntrain:\n{train}'
    )
    return load_config(str(tmp_path / "c.yaml"))


def test_the_cap_reaches_the_kernels_operands_and_the_planner(tmp_path):
    assert load_config(None).options().kernel == KernelOptions()
    cfg = _config(tmp_path, "  dequant_cap_mib: 48\n  fast_path: 'on'\n  gradient_checkpointing: false\n")
    opts = cfg.options()
    assert opts.kernel.dequant_cap_bytes == 48 << 20 and opts.fast_path == "on"
    model, notes = _model(), []
    accel.prepare(model, opts, note=notes.append)  # the interpreted kernels on this CPU model
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, FastLoRAMLP) and mlp.ops.opts is opts.kernel
    assert linear_spec(mlp.gate_proj, True, mlp.ops.opts, None).opts.dequant_cap_bytes == 48 << 20
    assert any("over 48 MiB" in n for n in notes)
    accel.restore(model)
    shape = builtin_shape("llama2-7b")
    capped = workload_from_config(cfg, shape).with_(kernels="fused", method="qlora")
    assert capped.dequant_cap_mib == 48
    assert dequant_bytes(capped) <= 48 << 20 < dequant_bytes(capped.with_(dequant_cap_mib=0))


def test_experimental_switches_reach_the_kernel_options(tmp_path):
    (tmp_path / "c.yaml").write_text(
        'model: {path: "builtin:tiny-llama"}\ndata: {path: "builtin:demo"}\nexperimental: {fused_ds_db: true}\n'
    )
    kernel = load_config(str(tmp_path / "c.yaml")).options().kernel
    assert kernel == KernelOptions(fused_ds_db=True)


def test_fp8_on_a_cpu_model_is_refused_with_the_fix():
    model = _model(torch.bfloat16)
    with pytest.raises(LorafuseError) as err:
        accel.prepare(model, Options(gradient_checkpointing=False, kernel=KernelOptions(fp8=True)), note=print)
    text = str(err.value)
    assert "train.fp8" in text and "NVIDIA GPU" in text and "train.fp8: false" in text
    assert accel.accel_state(model) is None and not isinstance(model.model.layers[0].mlp, FastLoRAMLP)


@pytest.mark.parametrize(
    "capability, bf16, fused, want",
    [
        ((9, 0), True, True, ""),
        ((8, 9), True, True, ""),
        ((8, 0), True, True, "compute capability 8.9"),
        (None, True, True, "NVIDIA GPU"),
        ((9, 0), False, True, "bf16 compute"),
        ((9, 0), True, False, "fused kernels"),
    ],
)
def test_fp8_policy_names_what_is_missing(capability, bf16, fused, want):
    why = policy.fp8_blocker(capability, "the card", bf16, fused)
    assert (want in why) if want else why == ""


def test_no_module_reads_a_behaviour_switch_from_the_environment():
    """Behaviour lives in the config: the package reads no LORAFUSE_* variable but its cache folder (a path, like
    HF_HOME), and no module assigns to another module's attribute."""
    root = pathlib.Path(lorafuse.__file__).parent
    reads, writes = [], []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("LORAFUSE_"):
                if node.value != "LORAFUSE_CACHE":
                    reads.append(f"{path.name}: {node.value}")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                        if target.value.id in _imported_modules(tree):
                            writes.append(f"{path.name}: {target.value.id}.{target.attr}")
    assert reads == [] and writes == []


def _imported_modules(tree: ast.Module) -> set[str]:
    """Names bound to lorafuse modules by `from lorafuse.x import y` / `import lorafuse.x as y` in a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorafuse"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if pathlib.Path(lorafuse.__file__).parent.joinpath(*full.split(".")[1:]).with_suffix(".py").exists():
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            names.update(a.asname or a.name for a in node.names if a.name.startswith("lorafuse."))
    return names

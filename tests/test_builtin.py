"""The built-in tiny model's recipe (lorafuse.builtin) is the model the loader builds, and the planner reads it
without building anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorafuse import builtin
from lorafuse.model.load import resolve_model_path
from lorafuse.plan.shapes import load_shape


def test_the_recipe_is_the_built_models_shape():
    folder = Path(resolve_model_path(builtin.BUILTIN_MODEL))
    built = json.loads((folder / "config.json").read_text())
    recipe = builtin.model_config("tiny-llama")
    assert {k: built[k] for k in recipe} == recipe
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert load_shape(builtin.BUILTIN_MODEL).total_params == sum(p.numel() for p in model.parameters())


def test_the_planner_reads_the_builtin_shape_without_torch():
    code = (
        "import sys; from lorafuse.plan.shapes import load_shape; s = load_shape('builtin:tiny-llama'); "
        "print(s.hidden_size, 'torch' in sys.modules, 'lorafuse.model' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["128", "False", "False"]


def test_bundled_data_sets_are_package_files():
    assert all(builtin.data_path(name).is_file() for name in builtin.DATA_SETS)
    assert builtin.data_path("builtin:demo") == builtin.data_path("demo") and builtin.data_path("nope") is None
    assert builtin.demo_corpus() and all(isinstance(t, str) for t in builtin.demo_corpus())

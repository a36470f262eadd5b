"""train.dequant_cap_mib: from the YAML to the fused linears' cap and to the planner's buffer."""

from __future__ import annotations

from lorafuse.config import load_config
from lorafuse.kernels import lora_linear
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.plan.fit import workload_from_config
from lorafuse.plan.memory import dequant_bytes
from lorafuse.plan.shapes import builtin_shape
from lorafuse.train.runtime import prepare_model


def test_the_cap_reaches_the_kernels_and_the_planner(tmp_path, monkeypatch):
    monkeypatch.setattr(lora_linear, "DEQUANT_CAP_BYTES", lora_linear.ENV_DEQUANT_CAP_BYTES)
    assert load_config(None).train.dequant_cap_mib == 0
    (tmp_path / "c.yaml").write_text(
        'model: {path: "builtin:tiny-llama"}\ndata: {path: "builtin:demo"}\ntrain:\n  dequant_cap_mib: 48\n'
    )
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.train.dequant_cap_mib == 48
    model = build_tiny_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    notes = []
    prepare_model(model, False, note=notes.append, dequant_cap_mib=cfg.train.dequant_cap_mib)
    assert lora_linear.DEQUANT_CAP_BYTES == 48 << 20
    assert any("over 48 MiB" in n for n in notes)
    prepare_model(model, False, note=notes.append)  # a later run without the key goes back to the default
    assert lora_linear.DEQUANT_CAP_BYTES == lora_linear.ENV_DEQUANT_CAP_BYTES
    shape = builtin_shape("llama2-7b")
    capped = workload_from_config(cfg, shape).with_(kernels="fused", method="qlora")
    assert capped.dequant_cap_mib == 48
    assert dequant_bytes(capped) <= 48 << 20 < dequant_bytes(capped.with_(dequant_cap_mib=0))

"""apply_lora: peft's target matching, freezing, modules_to_save (tied and untied), counting, NF4 models.

peft 0.21.2 is the reference: the same tiny random-init model goes through `get_peft_model` and through
`apply_lora`, and the wrapped modules, parameter counts, printed line and logits must agree.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lorafuse.errors import ConfigError, LorafuseError
from lorafuse.lora.linear import LoRALinear, NF4Linear
from lorafuse.model.inject import apply_lora, find_linear_names, print_trainable_parameters, trainable_parameters
from lorafuse.model.tiny import build_tiny_model
from lorafuse.model_state import model_state

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _model(arch="llama", tie=False):
    return build_tiny_model(
        arch, vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, tie_word_embeddings=tie
    ).eval()


def _peft(model, **cfg):
    from peft import LoraConfig, get_peft_model

    cfg.setdefault("task_type", "CAUSAL_LM")
    return get_peft_model(model, LoraConfig(**cfg))


def _peft_targets(pm) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def _ours_targets(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _randomize_and_copy(ours, pm):
    """Random non-zero B (and perturbed DoRA magnitudes) in our model, copied into peft's."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if not isinstance(layer, LoRALinear):
                continue
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            theirs = pm.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if layer.use_dora:
                assert torch.equal(layer.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
                theirs.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 2], [1, 7, 7, 3, 60, 61, 62, 2]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
def test_all_linear_matches_peft(arch, variant, capsys):
    base = _model(arch)
    kw = dict(rslora=variant == "rslora", dora=variant == "dora")
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.0, targets="all-linear", **kw)
    pm = _peft(
        base,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
        use_rslora=kw["rslora"],
        use_dora=kw["dora"],
    )
    wrapped = _ours_targets(ours)
    assert wrapped == _peft_targets(pm) == set(pm.peft_config["default"].target_modules)
    assert len(wrapped) == 2 * 7 and "lm_head" not in wrapped
    assert model_state(ours).lora["target_modules"] == sorted(wrapped)  # full paths, as peft writes "all-linear"
    assert isinstance(ours.lm_head, nn.Linear) and not ours.lm_head.weight.requires_grad
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    if arch == "qwen2":  # q/k/v carry a bias: kept, frozen
        q = ours.model.layers[0].self_attn.q_proj
        assert q.bias is not None and not q.bias.requires_grad

    assert trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    print_trainable_parameters(ours)
    line = capsys.readouterr().out
    pm.print_trainable_parameters()
    assert line == capsys.readouterr().out
    assert line.startswith("trainable params: ") and " || all params: " in line and " || trainable%: " in line

    _randomize_and_copy(ours, pm)
    with torch.no_grad():
        ours_logits, peft_logits = ours(IDS).logits, pm(IDS).logits
    print(f"{arch} {variant}: max |ours - peft| logits = {(ours_logits - peft_logits).abs().max():.3e}")
    assert torch.equal(ours_logits, peft_logits)


@pytest.mark.parametrize(
    "targets,exclude",
    [
        (["q_proj", "v_proj"], None),
        (["model.layers.0.mlp.down_proj", "k_proj"], None),
        (r".*\.(q|v)_proj", None),
        (r"model\.layers\.1\..*_proj", ["o_proj"]),
        (["q_proj", "up_proj"], r".*layers\.0\..*"),
        ("all-linear", ["gate_proj", "down_proj"]),
    ],
)
def test_list_regex_and_exclude_match_peft(targets, exclude):
    base = _model()
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=8, targets=targets, exclude=exclude)
    pm = _peft(base, r=4, lora_alpha=8, target_modules=targets, exclude_modules=exclude)
    assert _ours_targets(ours) == _peft_targets(pm) and _ours_targets(ours)
    if targets != "all-linear":
        assert model_state(ours).lora["target_modules"] == targets  # names as given, or the regex string
    assert model_state(ours).lora["exclude_modules"] == exclude


def test_zero_matches_lists_the_linear_layers():
    with pytest.raises(ConfigError) as info:
        apply_lora(_model(), targets=["query", "value"])
    msg = str(info.value)
    assert "matched no module" in msg and "q_proj" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "all-linear" in info.value.fix and "lora.targets" in info.value.fix
    with pytest.raises(ConfigError, match="matched no module"):
        apply_lora(_model(), targets=r"q_proj")  # a regex must match the FULL name


def test_non_linear_match_and_bad_args_raise():
    with pytest.raises(ConfigError, match="not linear"):
        apply_lora(_model(), targets=["mlp"])
    for kw, word in [
        ({"r": 0}, "lora.r"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"init": "xavier"}, "lora.init"),
        ({"targets": "(q_proj"}, "regex"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ]:
        with pytest.raises(ConfigError, match=word):
            apply_lora(_model(), **kw)


def test_apply_twice_raises():
    model = apply_lora(_model(), targets=["q_proj"])
    with pytest.raises(LorafuseError, match="already applied"):
        apply_lora(model, targets=["v_proj"])


def test_recorded_config_and_find_linear_names():
    model = _model()
    assert find_linear_names(model) == LLAMA_LINEARS
    apply_lora(model, r=8, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"], rslora=True, init="gaussian")
    rec = model_state(model).lora
    assert {
        k: rec[k] for k in ("r", "alpha", "dropout", "target_modules", "rslora", "dora", "modules_to_save", "init")
    } == {
        "r": 8,
        "alpha": 16,
        "dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "rslora": True,
        "dora": False,
        "modules_to_save": None,
        "init": "gaussian",
    }
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.scaling == 16 / math.sqrt(8) and isinstance(layer.dropout, nn.Dropout)
    assert find_linear_names(model) == LLAMA_LINEARS  # LoRA's own lora_A / lora_B are not listed


def test_modules_to_save_untied_trains_in_place():
    base = _model()
    ours = apply_lora(
        copy.deepcopy(base), r=4, alpha=8, targets=r".*\.(q_proj|v_proj)|lm_head", modules_to_save=["lm_head"]
    )
    pm = _peft(base, r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)|lm_head", modules_to_save=["lm_head"])
    assert _ours_targets(ours) == _peft_targets(pm)  # lm_head excluded from LoRA in both
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight.requires_grad
    assert (
        model_state(ours).lora["modules_to_save"] == ["lm_head"]
        and model_state(ours).lora["trained_module_names"] == ["lm_head"]
        and model_state(ours).lora["ensure_weight_tying"] is False
    )
    t, a = trainable_parameters(ours)
    pt, pa = pm.get_nb_trainable_parameters()
    # peft's total counts its trainable copy of lm_head too; we train in place but report peft's numbers
    assert (t, a) == (pt, pa)


def test_modules_to_save_tied_pair_stays_tied():
    base = _model(tie=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=8, targets=["q_proj"], modules_to_save=["embed_tokens"])
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and ours.lm_head.weight.requires_grad
    rec = model_state(ours).lora
    assert rec["ensure_weight_tying"] is True and rec["trained_module_names"] == ["lm_head", "model.embed_tokens"]
    pm = _peft(
        base, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True
    )
    print("tied:", trainable_parameters(ours), pm.get_nb_trainable_parameters())
    assert trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    # a step on the embedding moves the output head with it (peft's ensure_weight_tying=True behaviour)
    before = ours.lm_head.weight.detach().clone()
    ours(IDS, labels=IDS).loss.backward()
    with torch.no_grad():
        ours.model.embed_tokens.weight.sub_(ours.model.embed_tokens.weight.grad)
    assert not torch.equal(ours.lm_head.weight, before)


def _quantize_linears(model):
    """Every nn.Linear except the output head becomes an NF4Linear (what load_model(quant="nf4") does)."""
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.from_linear(module))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_nf4_model_counts_keys_and_equals_dense_lora(arch):
    dense = _model(arch)
    n_dense = sum(p.numel() for p in dense.parameters())
    linear_sizes = [m.weight.numel() for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    qmodel = _quantize_linears(copy.deepcopy(dense))
    assert find_linear_names(qmodel) == LLAMA_LINEARS
    apply_lora(qmodel, r=4, alpha=8, targets="all-linear", dropout=0.0)
    wrapped = [m for m in qmodel.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == len(linear_sizes) and all(m.is_nf4 for m in wrapped)

    n_lora = sum(p.numel() for n, p in qmodel.named_parameters() if ".lora_" in n)
    # peft counts a bitsandbytes 4-bit weight as its packed uint8 elements * 2 = ceil(n/2) * 2
    expected_all = n_dense - sum(linear_sizes) + sum((n + 1) // 2 * 2 for n in linear_sizes) + n_lora
    assert trainable_parameters(qmodel) == (n_lora, expected_all)

    sd = qmodel.state_dict()
    for suffix in (
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
        "lora_A.weight",
        "lora_B.weight",
    ):
        assert f"model.layers.0.self_attn.q_proj.{suffix}" in sd
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8

    # QLoRA model == LoRA model whose linears hold the dequantized weights (same A, B)
    ref = copy.deepcopy(dense)
    for name, m in qmodel.named_modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.normal_(0, 0.1)
                ref.get_submodule(name).weight.copy_(m.base_weight(torch.float32))
    apply_lora(ref, r=4, alpha=8, targets="all-linear", dropout=0.0)
    ref.load_state_dict({k: v for k, v in qmodel.state_dict().items() if ".lora_" in k}, strict=False)
    q_loss, r_loss = qmodel(IDS, labels=IDS).loss, ref(IDS, labels=IDS).loss
    q_loss.backward()
    r_loss.backward()
    assert torch.equal(q_loss, r_loss)
    ref_params = dict(ref.named_parameters())
    grads = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * len(linear_sizes) and all(g is not None for g in grads.values())
    for n, g in grads.items():
        assert torch.equal(g, ref_params[n].grad), n

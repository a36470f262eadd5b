"""The fast path swaps modules by instance: same keys and Parameters, same loss and LoRA grads."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafuse import accel
from lorafuse.accel.fast_path import FastAttention, FastLoRAMLP, FastRMSNorm, apply_fast_path, remove_fast_path
from lorafuse.errors import LorafuseError
from lorafuse.kernels import _runtime
from lorafuse.options import Options


def _tiny(arch="llama", dropout=0.0, dora=False, nf4=False, seed=0, layers=2):
    from lorafuse.lora.linear import LoRALinear, NF4Linear
    from lorafuse.model.inject import apply_lora
    from lorafuse.model.tiny import build_tiny_model

    model = build_tiny_model(
        arch,
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        seed=seed,
    )
    if nf4:  # what load_model(quant="nf4") does to every decoder linear
        for layer in model.model.layers:
            for part in (layer.self_attn, layer.mlp):
                for name, child in list(part.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(part, name, NF4Linear.from_linear(child))
    apply_lora(model, r=4, alpha=8, dropout=dropout, targets="all-linear", dora=dora)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking B (peft inits B = 0, which would hide LoRA bugs)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    res = {"logits": out.logits.detach(), "loss": out.loss.detach().reshape(1)}
    res.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return res


def _compare(arch, use_reference, parity, nf4=False, checkpointing=False, layers=2, tokens=(2, 9)):
    base = _tiny(arch, nf4=nf4, layers=layers).train()
    ids = torch.randint(0, 96, tokens, generator=torch.Generator().manual_seed(3))
    oracle = _step(copy.deepcopy(base).double(), ids)
    fast = copy.deepcopy(base)
    keys, params = list(fast.state_dict()), [id(p) for p in fast.parameters()]
    state, reason = apply_fast_path(fast, use_reference=use_reference)
    assert state is not None, reason
    assert list(fast.state_dict()) == keys, "state_dict keys must not change"
    assert [id(p) for p in fast.parameters()] == params, "the optimizer's Parameters must not change"
    assert isinstance(fast.model.layers[0].mlp, FastLoRAMLP)
    assert isinstance(fast.model.layers[-1].input_layernorm, FastRMSNorm)
    assert isinstance(fast.model.layers[0].self_attn, FastAttention)
    if checkpointing:
        for m in (base, fast):  # transformers 5.x renamed gradient_checkpointing_enable
            (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    ref, got = _step(base, ids), _step(fast, ids)
    assert set(got) == set(oracle) and len(got) > 2
    for name in oracle:
        parity(f"{arch}/{name}", got[name], ref[name], oracle[name])
    return fast, state


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_reference_swap_matches_unswapped(arch, parity):
    _compare(arch, use_reference=True, parity=parity)


def test_reference_swap_qlora(parity):
    _compare("llama", use_reference=True, parity=parity, nf4=True)


def test_kernel_swap_matches_unswapped(device, parity, monkeypatch):
    """The Triton ops (interpreted on a CPU) inside a real model, under gradient checkpointing (GQA: k and v
    narrower than q)."""
    if device.type == "cuda":
        pytest.skip("tiny fp32 model test; the GPU runs the same ops in the gpu-marked kernel tests")
    sdpa, v_owns = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):  # SDPA saves v: it must not be a view that pins the whole q|k|v output
        v_owns.append(v.untyped_storage().nbytes() == v.numel() * v.element_size())
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _, state = _compare(
        "mistral", use_reference=False, parity=parity, checkpointing=True, layers=1, tokens=(1, 6)
    )  # the interpreter runs every program in Python: few tokens
    assert state.ops.name == "triton"
    assert v_owns and all(v_owns)


def test_kernel_swap_with_nf4_bias_and_dropout(device, parity):
    """Qwen2 (q/k/v biases) on NF4 bases with LoRA dropout: the kernel swap and the reference swap draw the same
    masks from one seed base, so the loss and every LoRA gradient agree (oracle: the reference swap in fp64)."""
    if device.type == "cuda":
        pytest.skip("tiny fp32 model test; the GPU runs the same ops in the gpu-marked kernel tests")
    base = _tiny("qwen2", dropout=0.2, nf4=True, layers=1).train()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    res = {}
    for name, model, use_reference in (
        ("oracle", copy.deepcopy(base).double(), True),
        ("ref", copy.deepcopy(base), True),
        ("got", copy.deepcopy(base), False),
    ):
        state, reason = apply_fast_path(model, use_reference=use_reference)
        assert state is not None, reason
        state.set_dropout_seed(9)
        res[name] = _step(model, ids)
    assert any(".q_proj.lora_A" in n for n in res["got"]) and len(res["got"]) > 2
    for name in res["oracle"]:
        parity(f"qwen2-nf4-dropout/{name}", res["got"][name], res["ref"][name], res["oracle"][name])


def test_class_is_untouched_and_swap_is_reversible():
    model = _tiny()
    attn_cls, mlp_cls = type(model.model.layers[0].self_attn), type(model.model.layers[0].mlp)
    cls_forward, attn = attn_cls.forward, model.model.layers[0].self_attn
    state, _ = apply_fast_path(model, use_reference=True)
    assert attn_cls.forward is cls_forward and "forward" not in vars(attn), "the original module is left as it was"
    assert apply_fast_path(model, use_reference=True) == (None, "the fast path is already applied")
    remove_fast_path(model, state)
    assert type(model.model.layers[0].mlp) is mlp_cls and model.model.layers[0].self_attn is attn
    assert not isinstance(model.model.norm, FastRMSNorm)
    ours = [name for m in model.modules() for name in vars(m) if name.startswith("lorafuse")]
    assert ours == ["lorafuse_state"], "the model carries one state object (lorafuse.model_state), nothing else"


def test_dropout_is_seeded_and_eval_is_exact():
    model = _tiny(dropout=0.2)
    fast = copy.deepcopy(model)
    state, _ = apply_fast_path(fast, use_reference=True)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    fast.train()
    state.set_dropout_seed(7)
    a = _step(fast, ids)
    c = _step(fast, ids)  # the base advanced: new masks
    state.set_dropout_seed(7)
    b = _step(fast, ids)
    assert all(torch.equal(a[n], b[n]) for n in a), "same seed base, same dropout masks"
    assert not torch.equal(a["loss"], c["loss"]), "each training forward draws new masks"
    assert int(state.dropout_base) == 8
    assert all(torch.isfinite(t).all() for t in a.values())
    model.eval(), fast.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fast(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_blockers_give_one_line_reasons():
    from lorafuse.model.tiny import build_tiny_model

    state, reason = apply_fast_path(build_tiny_model("gpt2", vocab_size=96, hidden_size=32, num_layers=1))
    assert state is None and "GPT2LMHeadModel is not a supported architecture" in reason
    state, reason = apply_fast_path(_tiny(dora=True), use_reference=True)
    assert state is None and "DoRA" in reason and "\n" not in reason
    if _runtime.INTERPRET:
        with _runtime.cpu_kernels(False):
            state, reason = apply_fast_path(_tiny())
        assert state is None and "CUDA" in reason


def test_prepare_applies_the_fast_path_by_the_options_and_restore_undoes_it():
    """train.fast_path through accel.prepare: "off" leaves the modules, "on" applies (here the interpreted kernels)
    or stops with the reason and the fix, and restore puts the original modules back."""
    notes = []
    model = _tiny()
    mlp = model.model.layers[0].mlp
    state = accel.prepare(model, Options(fast_path="off", gradient_checkpointing=False), note=notes.append)
    assert state.fast is None and model.model.layers[0].mlp is mlp and accel.accel_state(model) is state
    state = accel.prepare(model, Options(fast_path="on", gradient_checkpointing=False), note=notes.append)
    assert isinstance(model.model.layers[0].mlp, FastLoRAMLP) and state.fast.ops.name == "triton"
    accel.restore(model)
    assert model.model.layers[0].mlp is mlp and accel.accel_state(model) is None
    with pytest.raises(LorafuseError, match="fast path cannot apply.*DoRA"):
        accel.prepare(_tiny(dora=True), Options(fast_path="on", gradient_checkpointing=False), note=notes.append)


def test_dropout_masks_survive_checkpoint_recompute():
    """With checkpointing the backward recomputes each layer: the device seed makes it regenerate the forward's
    masks (the base is advanced by the decoder stack's forward, which a recompute does not re-run), so the
    gradients equal those of the same step without checkpointing."""
    base = _tiny(dropout=0.3)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    grads = []
    for checkpointing in (False, True):
        fast = copy.deepcopy(base)
        state, _ = apply_fast_path(fast, use_reference=True)
        if checkpointing:
            fast.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}
            )
        fast.train()
        state.set_dropout_seed(11)
        grads.append(_step(fast, ids))
    plain, ckpt = grads
    assert all(torch.allclose(plain[n], ckpt[n], rtol=1e-6, atol=1e-7) for n in plain)


@pytest.mark.parametrize("case", ["no mask", "padding mask", "packed", "sliding window"])
def test_mask_built_for_a_maskless_call_reaches_sdpa_as_is_causal(monkeypatch, case):
    """While a CUDA graph is captured, transformers materializes the (T, T) causal mask even when the stack got no
    mask (its "is tracing" check), which sends SDPA to a slower masked kernel. The fast path hands SDPA is_causal
    instead, but only when the stack really got no mask, had no cache offset and no sliding window cuts in.
    Simulated here: a pre-hook gives every attention module the causal mask transformers would build."""
    arch = "mistral" if case == "sliding window" else "llama"
    fast = _tiny(arch).train()
    if case == "sliding window":
        fast.config.sliding_window = 4
    state, reason = apply_fast_path(fast, use_reference=True)
    assert state is not None, reason
    if case == "sliding window":
        for layer in fast.model.layers:
            layer.self_attn.sliding_window = 4
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    causal = torch.ones(9, 9, dtype=torch.bool).tril_()[None, None].expand(2, 1, 9, 9)
    kwargs = {}
    if case == "padding mask":
        kwargs["attention_mask"] = torch.ones(2, 9, dtype=torch.long)
        kwargs["attention_mask"][1, 6:] = 0
    if case == "packed":
        kwargs["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)

    def inject(mod, args, kw):  # a maskless call's causal mask, as transformers builds it during a capture
        if kw.get("attention_mask") is None:  # (with a window or padding, transformers builds its own mask)
            kw["attention_mask"] = causal
        return args, kw

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    with torch.no_grad():
        plain = fast(input_ids=ids, **kwargs).logits
        hooks = [layer.self_attn.register_forward_pre_hook(inject, with_kwargs=True) for layer in fast.model.layers]
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        injected = fast(input_ids=ids, **kwargs).logits
    for h in hooks:
        h.remove()
    assert len(seen) == len(fast.model.layers)
    if case == "no mask":
        assert seen == [(True, True)] * len(fast.model.layers), "the built causal mask should become is_causal"
    else:  # a real mask (padding, packed block-diagonal, sliding window) must reach SDPA
        assert all(not none for none, _ in seen), seen
    torch.testing.assert_close(injected, plain, rtol=0, atol=1e-5)
    remove_fast_path(fast, state)
    assert not isinstance(fast.model.layers[0].self_attn, FastAttention)


@pytest.mark.gpu
def test_a_captured_maskless_forward_uses_sdpa_is_causal(monkeypatch):
    """The real trigger (transformers 5.17 on the GPU machine): while a CUDA graph is being captured, transformers
    builds the causal mask for a maskless call; the fast path must still reach SDPA with is_causal and no mask,
    and the replay must give the eager logits."""
    fast = _tiny().to("cuda", torch.bfloat16).train()
    state, reason = apply_fast_path(fast)
    assert state is not None, reason
    ids = torch.randint(0, 96, (2, 64), device="cuda")
    with torch.no_grad():
        eager = fast(input_ids=ids).logits
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        fast(input_ids=ids)  # warm-up outside the capture, as the loop's eager steps do
    torch.cuda.current_stream().wait_stream(side)
    seen.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fast(input_ids=ids).logits
    assert seen == [(True, True)] * len(fast.model.layers), seen
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("mode", [True, "offload"])
def test_recompute_skips_the_down_projection_and_keeps_every_gradient(device, monkeypatch, mode):
    """lorafuse's checkpointing (plain and offload) marks the recompute; there the fused MLP forms only S_d of the
    down projection (no base GEMM: its output feeds nothing the backward reads), and in the checkpointed forward it
    writes SwiGLU over the gate output. Loss and every LoRA gradient equal those of the same step without
    checkpointing, bit for bit; dropout on, so S_d's mask is regenerated."""
    from lorafuse.kernels import swiglu_mlp

    full, down_only, in_place = [], [], []
    forward, down, act = swiglu_mlp.lora_forward, swiglu_mlp.lora_down, swiglu_mlp.swiglu_forward
    monkeypatch.setattr(
        swiglu_mlp, "lora_forward", lambda x, ops, xq=None: full.append(ops.lw.out_features) or forward(x, ops, xq)
    )
    monkeypatch.setattr(swiglu_mlp, "lora_down", lambda x, ops: down_only.append(ops.lw.out_features) or down(x, ops))
    monkeypatch.setattr(
        swiglu_mlp, "swiglu_forward", lambda e, g, out=None: in_place.append(out is e) or act(e, g, out=out)
    )
    base = _tiny(dropout=0.1, layers=2, seed=4)  # fp32 in the interpreter; bf16 on a GPU (same kernels both runs)
    base = base.to(device, torch.bfloat16) if device.type == "cuda" else base
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(6)).to(device)
    res = {}
    for checkpointing in (False, mode):
        model = copy.deepcopy(base)
        state = accel.prepare(model, Options(fast_path="on", gradient_checkpointing=checkpointing), note=print)
        model.train()
        state.fast.set_dropout_seed(13)
        full.clear(), down_only.clear(), in_place.clear()
        res[checkpointing] = _step(model, ids)
        res[checkpointing]["calls"] = (list(full), list(down_only))
        res[checkpointing]["in_place"] = list(in_place)
    hidden, inter = 64, 96
    assert res[False]["calls"] == ([inter, inter, hidden] * 2, [])
    # forward: gate, up, down per layer; recompute (layer 1, then 0): gate and up in full, down's S alone
    assert res[mode]["calls"] == ([inter, inter, hidden] * 2 + [inter, inter] * 2, [hidden] * 2)
    # SwiGLU's product written over the gate output in the checkpointed forward (its saved set is dropped, or never
    # kept: offload's forward runs without a graph), never where the backward reads it
    assert res[False]["in_place"] == [False, False] and res[mode]["in_place"] == [True, True, False, False]
    plain, ckpt = res[False], res[mode]
    grads = [n for n in plain if n not in ("calls", "logits", "in_place")]
    assert any("down_proj.lora_A" in n for n in grads)
    for n in grads:
        assert torch.equal(plain[n], ckpt[n]), n


def test_a_trained_embedding_keeps_the_decoder_in_the_compute_dtype():
    """lora.modules_to_save: [embed_tokens, lm_head] on a bf16 model: prepare keeps the trained embedding's master in
    fp32 and casts its output to bf16, so the decoder runs in bf16, the fused kernels apply, and the embedding
    still gets its fp32 gradient."""
    from lorafuse.model.inject import apply_lora
    from lorafuse.model.tiny import build_tiny_model

    model = build_tiny_model("llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2).bfloat16()
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear", modules_to_save=["embed_tokens", "lm_head"])
    notes = []
    state = accel.prepare(model, Options(fast_path="on", gradient_checkpointing=False), note=notes.append)
    assert state.fast is not None and state.embedding_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert any("output is cast to torch.bfloat16" in n for n in notes)
    accel.restore(model)
    accel.prepare(model, Options(fast_path="off", gradient_checkpointing=False), note=notes.append)
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs a 16-bit model (CUDA: the same on cuda)
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert seen == [torch.bfloat16]
    grad = model.model.embed_tokens.weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0

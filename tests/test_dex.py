"""DEX (diffattn.dex): surgery identity, the reference equation, gradients, λ schedule, head selection,
adapter round trip, exact merge — on tiny random Llama/Mistral/Qwen/Gemma 3 models built here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from diffattn.dex import (DEXOptions, DEXOutputProjection, LoRAOutputProjection, UnsupportedModelError,
                          adapter_modules, apply_dex, attention_entropy, base_fingerprint, configure_trainable,
                          dex_lambda, head_importance, lambda_init_for_depth, load_adapter, merge_adapters,
                          parse_head_list, save_adapter, select_heads, set_dex_step)
from diffattn.dex.heads import choose_heads, heads_per_layer

V = 61


def tiny(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, sliding_window=6))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))
    elif family == "gemma3":
        # head_dim 16 ≠ hidden/heads, sliding windows on some layers, final logit soft-capping
        m = Gemma3ForCausalLM(Gemma3TextConfig(**{**common, "num_hidden_layers": 3, "num_key_value_heads": 1},
                                               head_dim=16, sliding_window=5, final_logit_softcapping=30.0))
    else:
        raise KeyError(family)
    return m.eval()


FAMILIES = ["llama", "gemma3"]
ALL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def ids(batch=2, T=12, seed=1):
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapter(model, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapter_modules(model):
            for name, p in m.adapter_tensors().items():
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- surgery: identity and the equation

@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("f_d", ["layer", "head"])
def test_identity_at_init_is_exact(family, f_d):
    m = tiny(family)
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
        apply_dex(m, {0: [1, 3], 1: [0, 1, 2, 3]}, DEXOptions(f_d=f_d, anneal_steps=10))
        out = m(x).logits
    assert len(adapter_modules(m)) == 2
    # bitwise: W_D = 0 at initialisation, so O − λ·O·W_D is O − 0 = O exactly in IEEE arithmetic; same kernels
    assert torch.equal(ref, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_zero_at_t0_is_identity_even_with_nonzero_wd(family):
    m = tiny(family)
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
        apply_dex(m, {0: [0, 2]}, DEXOptions(anneal_steps=10))
        randomize_adapter(m)
        set_dex_step(m, 0)
        # bitwise on any CPU and thread count: λ(0) = 0, so O − λ·O·W_D is O − 0 = O exactly, and everything else is
        # the same forward in the same process at the same thread count as ref
        assert torch.equal(m(x).logits, ref)
        set_dex_step(m, 5)
        assert not torch.allclose(m(x).logits, ref)


def test_head_norm_identity_at_init_up_to_rounding():
    m = tiny("llama")
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
        apply_dex(m, {0: [1], 1: [2, 3]}, DEXOptions(head_norm="rms"))
        torch.testing.assert_close(m(x).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("f_d", ["layer", "head"])
@pytest.mark.parametrize("head_norm", ["none", "rms"])
def test_wrapper_matches_reference_equation(f_d, head_norm):
    """O'_h = O_h − λ(t)·O_h·W_D on selected heads (+ RMSNorm(O')·rms(O)·g), others unchanged, then o_proj."""
    torch.manual_seed(0)
    H, d, T = 4, 8, 10
    base = nn.Linear(H * d, 32, bias=True).double()
    heads = [0, 2]
    opts = DEXOptions(f_d=f_d, head_norm=head_norm, anneal_steps=8, lambda_learn_init=0.3)
    w = DEXOutputProjection(base, layer_idx=3, n_head=H, head_dim=d, heads=heads, options=opts).double()
    with torch.no_grad():
        w.W_D.normal_()
        if w.norm_gain is not None:
            w.norm_gain.uniform_(0.5, 1.5)
    w.step = 3
    x = torch.randn(2, T, H * d, dtype=torch.float64)
    lam = (1 - 3 / 8) * (3 / 8) * (0.8 - 0.6 * math.exp(-0.9)) + (3 / 8) * 0.3
    O = x.view(2, T, H, d).clone()
    for j, h in enumerate(heads):
        W = w.W_D if f_d == "layer" else w.W_D[j]
        new = O[:, :, h] - lam * O[:, :, h] @ W
        if head_norm == "rms":
            rms = lambda v: torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
            new = new / rms(new) * rms(O[:, :, h]) * w.norm_gain[j]
        O[:, :, h] = new
    ref = base(O.reshape(2, T, H * d))
    torch.testing.assert_close(w(x), ref, atol=1e-12, rtol=1e-10)


def test_linear_control_is_o_plus_ow_and_lora_control_adds_low_rank():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False).double()
    w = DEXOutputProjection(base, layer_idx=0, n_head=2, head_dim=8, heads=[1], options=DEXOptions(method="linear")).double()
    with torch.no_grad():
        w.W_D.normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    O = x.view(3, 2, 8).clone()
    O[:, 1] = O[:, 1] + O[:, 1] @ w.W_D
    torch.testing.assert_close(w(x), base(O.reshape(3, 16)))
    assert w.lambda_learn is None
    lo = LoRAOutputProjection(base, layer_idx=0, rank=2).double()
    with torch.no_grad():
        lo.lora_B.normal_()
    torch.testing.assert_close(lo(x), x @ (base.weight + lo.lora_B @ lo.lora_A).T)


# ---------------------------------------------------------------- λ schedule

@pytest.mark.parametrize("depth", [0, 1, 5, 29])
def test_schedule_formula_at_0_half_T_2T(depth):
    T, li, ll = 100, lambda_init_for_depth(depth), 0.37
    assert li == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * depth))
    assert dex_lambda(0, T, li, ll) == 0.0
    assert dex_lambda(T / 2, T, li, ll) == pytest.approx(0.5 * 0.5 * li + 0.5 * ll)
    assert dex_lambda(T, T, li, ll) == pytest.approx(ll)
    assert dex_lambda(2 * T, T, li, ll) == pytest.approx(ll)
    t = 37  # general point: (1 − t/T)(t/T)λ_init + (t/T)λ_learn
    assert dex_lambda(t, T, li, ll) == pytest.approx((1 - t / T) * (t / T) * li + (t / T) * ll)


def test_additive_schedule_and_reach():
    from diffattn.dex.schedule import lambda_reach

    T, li, ll = 10, 0.6, 0.05
    assert dex_lambda(0, T, li, ll, "additive") == pytest.approx(ll)
    assert dex_lambda(5, T, li, ll, "additive") == pytest.approx(0.5 * li + ll)
    assert dex_lambda(T, T, li, ll, "additive") == dex_lambda(3 * T, T, li, ll, "additive") == pytest.approx(li + ll)
    with pytest.raises(ValueError, match="additive, quoted"):
        dex_lambda(1, T, li, ll, "cosine")
    assert lambda_reach([1e-3] * 64) == pytest.approx(0.064)  # the committed study's cap: 64 steps of lr ≤ 1e-3
    assert lambda_reach([0.1, 0.2], start=0.5) == pytest.approx(0.8)


def test_schedule_depth_values_and_constant_mode():
    got = [round(lambda_init_for_depth(d), 3) for d in range(4)]
    assert got == [0.2, 0.356, 0.471, 0.556]
    assert lambda_init_for_depth(7, 0.5) == 0.5
    assert lambda_init_for_depth(7, "0.8") == 0.8
    with pytest.raises(ValueError, match="lambda_init"):
        lambda_init_for_depth(0, "deep")


def test_wrapper_lambda_follows_the_schedule():
    m = tiny("llama")
    apply_dex(m, {1: [0]}, DEXOptions(anneal_steps=40, lambda_learn_init=0.1))
    (w,) = adapter_modules(m)
    li = 0.8 - 0.6 * math.exp(-0.3)
    for t, want in [(0, 0.0), (20, 0.25 * li + 0.05), (40, 0.1), (80, 0.1)]:
        w.step = t
        assert float(w.current_lambda().detach()) == pytest.approx(want)


# ---------------------------------------------------------------- trainable parameters

@pytest.mark.parametrize("family", FAMILIES)
def test_train_dex_gradients_reach_only_wd_and_lambda(family):
    m = tiny(family)
    apply_dex(m, {0: [0, 1], 1: [3]}, DEXOptions(anneal_steps=10))
    randomize_adapter(m, 0.1)
    params = configure_trainable(m, "dex")
    set_dex_step(m, 5)
    x = ids()
    logits = m(x).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    adapter = {id(p) for w in adapter_modules(m) for p in w.adapter_tensors().values()}
    assert {id(p) for p in params} == adapter
    names = set()
    for name, p in m.named_parameters():
        if id(p) in adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            names.add(name.rsplit(".", 1)[-1])
        else:
            assert not p.requires_grad and p.grad is None, name
    assert names == {"W_D", "lambda_learn"}


def adapter_grads(m, x):
    """A function of t: (|∇W_D|, |∇λ_learn|) of every DEX wrapper of ``m`` for the LM loss on ``x`` at schedule step t."""
    def grads(t):
        set_dex_step(m, t)
        for w in adapter_modules(m):
            w.W_D.grad = w.lambda_learn.grad = None
        lg = m(x).logits
        F.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        return [(float(w.W_D.grad.abs().sum()), float(w.lambda_learn.grad.abs())) for w in adapter_modules(m)]
    return grads


def test_zero_init_is_a_stationary_point_that_the_schedule_leaves():
    """W_D = 0, λ = 0: no gradient reaches W_D or λ_learn; at t = 1 < T the λ_init term gives W_D one."""
    m = tiny("llama")
    apply_dex(m, {0: [0, 1], 1: [2]}, DEXOptions(anneal_steps=4))
    configure_trainable(m, "dex")
    grads = adapter_grads(m, ids())

    assert all(gw == 0 and gl == 0 for gw, gl in grads(0))
    assert all(gw > 0 and gl == 0 for gw, gl in grads(1))   # λ(1) = (3/4)(1/4)λ_init > 0; λ_learn waits for W_D ≠ 0
    assert all(gw == 0 and gl == 0 for gw, gl in grads(4))  # t ≥ T with λ_learn = 0: stuck (hence T ≥ 2 in the CLI)


def test_additive_default_gradients_reach_wd_at_the_first_step_after_t0_and_lambda_one_step_later():
    """The documented departure (docs/dex.md, "When gradients start"): DEX's function-preserving init (W_D = 0,
    λ(0) = α(0)·λ_init + λ_learn = 0) gives step 0 no gradient under any schedule; under the default additive
    schedule W_D has one from t = 1 and λ_learn as soon as W_D ≠ 0, and the schedule never sends them back to 0."""
    m = tiny("llama")
    apply_dex(m, {0: [0, 1], 1: [2]}, DEXOptions(anneal_steps=4, schedule="additive"))
    configure_trainable(m, "dex")
    grads = adapter_grads(m, ids())

    assert all(gw == 0 and gl == 0 for gw, gl in grads(0))
    assert all(gw > 0 and gl == 0 for gw, gl in grads(1))  # λ(1) = λ_init/4 > 0
    with torch.no_grad():  # one optimizer step moves W_D off zero
        for w in adapter_modules(m):
            w.W_D.sub_(1e-2 * w.W_D.grad.sign())
    assert all(gw > 0 and gl > 0 for gw, gl in grads(2))
    assert all(gw > 0 and gl > 0 for gw, gl in grads(40))  # t ≥ T: λ = λ_init + λ_learn, nothing collapses


@pytest.mark.parametrize("method", ["dex", "linear", "lora"])
def test_adapter_weights_stay_float32_on_a_bf16_base(method):
    """On a bf16 base (the GPU preset) the adapter keeps float32 weights, so AdamW's small steps are not rounded
    away (bf16's spacing at 0.5 is 0.002); at init the adapted model is still the base, bit for bit."""
    m = tiny("llama").to(torch.bfloat16)
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
    apply_dex(m, {0: [0, 1], 1: [2]}, DEXOptions(method=method, anneal_steps=4))
    params = configure_trainable(m, "dex")
    assert params and all(p.dtype == torch.float32 for p in params)
    set_dex_step(m, 2)
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref)  # W_D = 0 / B = 0: the base's bf16 logits exactly
    lg = m(x).logits
    assert lg.dtype == torch.bfloat16
    F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)
    if method == "dex":
        w = adapter_modules(m)[0]
        with torch.no_grad():
            w.lambda_learn.fill_(0.5)
            w.lambda_learn.add_(1e-4)  # one AdamW-sized step
        assert float(w.lambda_learn.detach()) != 0.5


def test_train_modes_dex_o_proj_and_all():
    m = tiny("llama")
    apply_dex(m, {1: [0]}, DEXOptions())
    p1 = configure_trainable(m, "dex+o_proj")
    (w,) = adapter_modules(m)
    assert {id(p) for p in p1} == {id(w.W_D), id(w.lambda_learn), id(w.base.weight)}
    p2 = configure_trainable(m, "all")
    assert len(p2) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="dex, dex\\+o_proj, all"):
        configure_trainable(m, "everything")


# ---------------------------------------------------------------- head selection

def hand_built_entropy_model():
    """Llama with q_proj of heads 1 and 3 zeroed (uniform attention: normalised entropy exactly 1) and the
    other heads' queries scaled up (peaked attention)."""
    m = tiny("llama", seed=3)
    d = 8
    with torch.no_grad():
        for layer in m.model.layers:
            q = layer.self_attn.q_proj.weight
            q.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
            for h in (1, 3):
                q[h * d:(h + 1) * d] = 0
    return m


def test_entropy_selects_the_uniform_heads_and_matches_the_definition():
    m = hand_built_entropy_model()
    windows = [ids(1, 16, seed=s) for s in range(3)]
    ent = attention_entropy(m, windows)
    assert ent.shape == (2, 4)
    torch.testing.assert_close(ent[:, [1, 3]], torch.ones(2, 2), atol=1e-6, rtol=0)
    assert (ent[:, [0, 2]] < 0.9).all()
    assert select_heads(ent, 0.5, highest=True) == {0: [1, 3], 1: [1, 3]}
    heads, record = choose_heads(m, "entropy", 0.5, windows)
    assert heads == {0: [1, 3], 1: [1, 3]} and record["criterion"] == "entropy"
    # the definition, from the maps transformers returns with output_attentions
    m.set_attn_implementation("eager")
    tot = torch.zeros(2, 4, dtype=torch.float64)
    n = 0
    for w in windows:
        att = m(w, output_attentions=True).attentions
        for l, a in enumerate(att):
            a = a[0].double()                                            # (H, T, T)
            e = -(a * torch.log(a.clamp_min(1e-300))).sum(-1)             # (H, T)
            pos = torch.arange(1, a.shape[-1], dtype=torch.float64)
            tot[l] += (e[:, 1:] / torch.log(pos + 1)).sum(-1)
        n += a.shape[-1] - 1
    torch.testing.assert_close(ent, (tot / n).float(), atol=1e-6, rtol=1e-6)
    assert m.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_is_the_loss_increase_when_a_head_is_zeroed(family):
    m = tiny(family, seed=4)
    sites_d = 8 if family == "llama" else 16
    with torch.no_grad():  # heads 0 and 2 of every layer contribute nothing: importance exactly 0
        for layer in m.model.layers:
            W = layer.self_attn.o_proj.weight
            for h in (0, 2):
                W[:, h * sites_d:(h + 1) * sites_d] = 0
    windows = [ids(2, 10, seed=7), ids(1, 10, seed=8)]
    imp, base = head_importance(m, windows)
    assert imp.shape == (len(m.model.layers), 4)
    assert (imp[:, [0, 2]] == 0).all()

    def loss(model):
        tot, n = 0.0, 0
        for w in windows:
            lg = model(w).logits
            tot += float(F.cross_entropy(lg[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            n += w[:, 1:].numel()
        return tot / n

    with torch.no_grad():
        assert base == pytest.approx(loss(m), rel=1e-6)
        for l, h in [(0, 1), (len(m.model.layers) - 1, 3)]:  # brute force: full forward with the head zeroed
            o = m.model.layers[l].self_attn.o_proj

            def zero(_m, args, h=h):
                x = args[0].clone()
                x[..., h * sites_d:(h + 1) * sites_d] = 0
                return (x,)
            hook = o.register_forward_pre_hook(zero)
            assert float(imp[l, h]) == pytest.approx(loss(m) - base, abs=1e-6)
            hook.remove()
    chosen = select_heads(imp, 0.5, highest=False)
    for l, hs in chosen.items():  # the two lowest loss increases of each layer, ties to the lower index
        order = sorted(range(4), key=lambda h: (float(imp[l, h]), h))
        assert hs == sorted(order[:2])


def test_select_heads_fraction_ties_and_explicit_lists():
    s = torch.tensor([[0.1, 0.9, 0.9, 0.2, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert select_heads(s, 0.4, highest=True) == {0: [1, 2], 1: [0, 1]}
    assert select_heads(s, 0.2, highest=False) == {0: [0], 1: [0]}
    assert heads_per_layer(9, 0.5) == 5 and heads_per_layer(9, 0.01) == 1 and heads_per_layer(4, 1.0) == 4
    with pytest.raises(ValueError, match="fraction"):
        heads_per_layer(4, 0)
    assert parse_head_list("1:3, 0:1,0:2,1:3", 2, 4) == {0: [1, 2], 1: [3]}
    with pytest.raises(ValueError, match="head 4 out of range"):
        parse_head_list("0:4", 2, 4)
    with pytest.raises(ValueError, match="layer 2 out of range"):
        parse_head_list("2:0", 2, 4)
    with pytest.raises(ValueError, match="LAYER:HEAD"):
        parse_head_list("0-1", 2, 4)
    m = tiny("llama")
    assert choose_heads(m, "all", 0.5)[0] == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert choose_heads(m, "1:2", 0.5)[0] == {1: [2]}
    with pytest.raises(ValueError, match="entropy, importance, all"):
        choose_heads(m, "random", 0.5)


# ---------------------------------------------------------------- adapter I/O and merge

CASES = [
    ("llama", dict(), "dex"),
    ("gemma3", dict(), "dex"),
    ("llama", dict(f_d="head", head_norm="rms"), "dex"),
    ("gemma3", dict(method="linear"), "dex+o_proj"),
    ("llama", dict(method="lora"), "dex"),
    ("gemma3", dict(), "all"),
]


@pytest.mark.parametrize("family,opts,train_mode", CASES)
def test_adapter_save_load_on_fresh_base_gives_same_logits(tmp_path, family, opts, train_mode):
    m = tiny(family)
    fp = base_fingerprint(m)
    heads = {0: [1, 2], 1: [0]}
    options = DEXOptions(anneal_steps=20, **opts)
    apply_dex(m, heads, options)
    randomize_adapter(m)
    if train_mode != "dex":  # pretend training moved base weights too
        with torch.no_grad():
            for w in adapter_modules(m):
                w.base.weight.add_(0.01)
            if train_mode == "all":
                m.model.embed_tokens.weight.mul_(1.1)
    set_dex_step(m, 13)
    x = ids()
    with torch.no_grad():
        want = m(x).logits
    save_adapter(m, tmp_path / "ad", options=options, heads=heads, train_mode=train_mode, fingerprint=fp, step=13)
    fresh = tiny(family)
    cfg = load_adapter(fresh, tmp_path / "ad")
    assert cfg["step"] == 13 and cfg["train_mode"] == train_mode
    with torch.no_grad():
        # bitwise: load_adapter copies into the fresh model's own tensors (same values, same kernels, one process)
        assert torch.equal(fresh(x).logits, want)
    size = (tmp_path / "ad" / "adapter.safetensors").stat().st_size
    if train_mode == "dex":
        assert size < 20_000  # the adapter only: W_D (+ λ_learn / gains / LoRA factors)


def test_adapter_refuses_a_different_base_and_a_bad_directory(tmp_path):
    m = tiny("llama", seed=0)
    fp = base_fingerprint(m)
    apply_dex(m, {0: [0]}, DEXOptions())
    save_adapter(m, tmp_path / "ad", options=DEXOptions(), heads={0: [0]}, train_mode="dex", fingerprint=fp, step=0)
    with pytest.raises(ValueError, match="different base"):
        load_adapter(tiny("llama", seed=1), tmp_path / "ad")
    with pytest.raises(ValueError, match="gemma3_text|model_type"):
        load_adapter(tiny("gemma3"), tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="not a DEX adapter"):
        load_adapter(tiny("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(tiny("llama"), tmp_path / "missing")


@pytest.mark.parametrize("family,opts", [("llama", {}), ("gemma3", {}), ("llama", {"f_d": "head"}),
                                         ("gemma3", {"method": "linear"}), ("llama", {"method": "lora"})])
def test_merge_gives_a_stock_model_with_equal_logits(tmp_path, family, opts):
    m = tiny(family)
    stock_cls = type(m)
    apply_dex(m, {0: [0, 3], 1: [1, 2, 3]}, DEXOptions(anneal_steps=10, **opts))
    randomize_adapter(m, 0.5)
    set_dex_step(m, 7)
    x = ids(2, 20)
    with torch.no_grad():
        want = m(x).logits
        merge_adapters(m)
        assert not adapter_modules(m)
        assert all(type(l.self_attn.o_proj) is nn.Linear for l in m.model.layers)
        assert (want - m(x).logits).abs().max() < 1e-5
    m.save_pretrained(tmp_path / "merged")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(re) is stock_cls
    with torch.no_grad():
        assert (re(x).logits - want).abs().max() < 1e-5


def test_merge_refuses_a_nonlinear_adapter_and_leaves_it_intact():
    m = tiny("llama")
    apply_dex(m, {0: [0], 1: [1]}, DEXOptions(head_norm="rms"))
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(m)
    assert len(adapter_modules(m)) == 2


# ---------------------------------------------------------------- errors

def test_unsupported_architecture_and_non_causal_lm_list_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3, gemma3_text"):
        apply_dex(gpt2, {0: [0]}, DEXOptions())
    with pytest.raises(UnsupportedModelError, match="not a causal LM.*llama"):
        apply_dex(tiny("llama").model, {0: [0]}, DEXOptions())


def test_bad_heads_and_options():
    m = tiny("llama")
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        apply_dex(m, {5: [0]}, DEXOptions())
    with pytest.raises(ValueError, match="head indices"):
        apply_dex(m, {0: [4]}, DEXOptions())
    with pytest.raises(ValueError, match="f_d must be one of layer, head"):
        DEXOptions(f_d="global")
    with pytest.raises(ValueError, match="method"):
        DEXOptions(method="lowrank")
    apply_dex(m, {0: [0]}, DEXOptions())
    with pytest.raises(ValueError, match="already carries an adapter"):
        apply_dex(m, {0: [1]}, DEXOptions())

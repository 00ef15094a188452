"""diffattn.nn (issue #17): drop-in differential attention layers for any PyTorch model.

Each layer equals an explicit per-head loop of its paper's equations (float64, forward and gradients) over
causal/bidirectional, with/without rotary, self-/cross-attention, GQA and key-padding masks; the kernels agree;
torch.compile runs; replace_attention swaps nn.MultiheadAttention inside nn.TransformerEncoder and trains; bad
arguments are ValueErrors naming the argument; and the layers are the decoder's implementation (same weights,
same output)."""

import math

import pytest
import torch
from torch import nn

from diffattn import ModelConfig
from diffattn import nn as dnn
from diffattn.model.attention import build_attention
from diffattn.model.layers import Rotary
from diffattn.nn.functional import differential_attention

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- references
def _rope(x, theta):
    """Interleaved rotary of x (S, d) at positions 0..S-1 (pairs (0,1), (2,3), ...), float64."""
    if theta is None:
        return x
    s, d = x.shape
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv  # (S, d/2)
    xe, xo = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = xe * ang.cos() - xo * ang.sin()
    out[:, 1::2] = xe * ang.sin() + xo * ang.cos()
    return out


def _allowed(t, s, causal, kpm_row, attn_mask):
    """(T, S) bool 'may attend' for one batch row (nn.MultiheadAttention's mask convention in the inputs)."""
    ok = torch.ones(t, s, dtype=torch.bool)
    if causal:
        ok &= torch.ones(t, s, dtype=torch.bool).tril(s - t)
    if kpm_row is not None:
        ok &= ~kpm_row[None, :]
    if attn_mask is not None:
        ok &= ~attn_mask
    return ok


def _softmax_rows(scores, ok):
    """Softmax over allowed keys; a row with none left is all zeros (the layers' documented behaviour)."""
    out = torch.zeros_like(scores)
    for i in range(scores.shape[0]):
        if ok[i].any():
            row = scores[i].masked_fill(~ok[i], float("-inf"))
            out[i] = torch.softmax(row, dim=-1)
    return out


def _lin(layer_linear, x):
    y = x @ layer_linear.weight.T
    return y + layer_linear.bias if layer_linear.bias is not None else y


def reference(layer, xq, xk, xv, *, causal=False, kpm=None, attn_mask=None):
    """The layer's paper equations as an explicit loop over batch rows and heads (float64)."""
    b, t, _ = xq.shape
    s = xk.shape[1]
    d, h, hkv, theta = layer.head_dim, layer.num_heads, layer.num_kv_heads, layer.rope_theta
    outs = []
    for bi in range(b):
        ok = _allowed(t, s, causal, None if kpm is None else kpm[bi], attn_mask)
        heads = []
        if isinstance(layer, (dnn.DiffAttention, dnn.SharedDiffAttention)):
            rep = h // hkv
            lam_vec = lambda n: getattr(layer, n).double()  # noqa: E731
            lam = (torch.exp(lam_vec("lambda_q1") @ lam_vec("lambda_k1")) - torch.exp(lam_vec("lambda_q2") @
                   lam_vec("lambda_k2")) + layer.lambda_init)
            if isinstance(layer, dnn.SharedDiffAttention):
                r = layer.config.shared_rank

                def proj(x, base, down, up, n, c):  # W_c = W_base + A_c B_c, sub-head n of component c
                    full = _lin(base, x) + (x @ down.weight[c * r:(c + 1) * r].T) @ up[c]
                    return full[:, n * d:(n + 1) * d]

                qc = lambda x, hh, c: proj(x, layer.q_base, layer.q_down, layer.q_up, hh, c)  # noqa: E731
                kc = lambda x, g, c: proj(x, layer.k_base, layer.k_down, layer.k_up, g, c)  # noqa: E731
            else:
                qc = lambda x, hh, c: _lin(layer.q_proj, x)[:, (2 * hh + c) * d:(2 * hh + c + 1) * d]  # noqa: E731
                kc = lambda x, g, c: _lin(layer.k_proj, x)[:, (2 * g + c) * d:(2 * g + c + 1) * d]  # noqa: E731
            for hh in range(h):
                g = hh // rep
                vv = _lin(layer.v_proj, xv[bi])[:, g * 2 * d:(g + 1) * 2 * d]
                a = [_softmax_rows(_rope(qc(xq[bi], hh, c), theta) @ _rope(kc(xk[bi], g, c), theta).T / math.sqrt(d), ok)
                     for c in (0, 1)]
                o = (a[0] - lam * a[1]) @ vv  # Eq. 1
                o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.config.norm_eps)  # per-head RMSNorm
                o = o * layer.head_norm.weight.double() * (1 - layer.lambda_init)  # gain, Eq. 3
                heads.append(o)
        elif isinstance(layer, dnn.DiffAttentionV2):
            rep = 2 * h // hkv
            lam = torch.sigmoid(xq[bi] @ layer.lambda_proj.weight.T)  # (T, H), one λ per token and head
            for hh in range(h):
                c = []
                for j in (2 * hh, 2 * hh + 1):  # query heads 2h, 2h+1 share K/V head j // rep
                    g = j // rep
                    q = _rope(_lin(layer.q_proj, xq[bi])[:, j * d:(j + 1) * d], theta)
                    k = _rope(_lin(layer.k_proj, xk[bi])[:, g * d:(g + 1) * d], theta)
                    c.append(_softmax_rows(q @ k.T / math.sqrt(d), ok) @ _lin(layer.v_proj, xv[bi])[:, g * d:(g + 1) * d])
                heads.append(c[0] - lam[:, hh:hh + 1] * c[1])
        else:
            rep = h // hkv
            for hh in range(h):
                g = hh // rep
                q = _rope(_lin(layer.q_proj, xq[bi])[:, hh * d:(hh + 1) * d], theta)
                k = _rope(_lin(layer.k_proj, xk[bi])[:, g * d:(g + 1) * d], theta)
                heads.append(_softmax_rows(q @ k.T / math.sqrt(d), ok) @ _lin(layer.v_proj, xv[bi])[:, g * d:(g + 1) * d])
        outs.append(_lin(layer.o_proj, torch.cat(heads, dim=-1)))
    return torch.stack(outs)


LAYERS = {
    "standard": lambda **kw: dnn.MultiheadAttention(48, 4, **kw),
    "diff_v1": lambda **kw: dnn.DiffAttention(48, 4, **kw),
    "diff_v2": lambda **kw: dnn.DiffAttentionV2(48, 4, **kw),
    "shared_diff": lambda **kw: dnn.SharedDiffAttention(48, 4, shared_init="random", **kw),
}


def _randomise(layer):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lambda_q" in name or "lambda_k" in name:
                p.normal_(0, 0.3)
            elif "head_norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0, 0.1)
    return layer


CASES = [  # (variant, kv heads, causal, rope, cross, padding)
    ("standard", None, False, None, False, False), ("standard", 2, True, 10000.0, False, True),
    ("diff_v1", None, False, None, False, False), ("diff_v1", 2, True, 10000.0, False, True),
    ("diff_v1", None, False, 500.0, True, True), ("diff_v1", 1, False, None, True, False),
    ("diff_v2", None, False, None, False, True), ("diff_v2", 2, True, 10000.0, False, False),
    ("diff_v2", 4, False, 500.0, True, True),
    ("shared_diff", None, True, 10000.0, False, True), ("shared_diff", 2, False, None, True, True),
]


@pytest.mark.parametrize("variant,kv,causal,rope,cross,padding", CASES)
def test_layer_equals_the_papers_equations_forward_and_gradients(variant, kv, causal, rope, cross, padding):
    torch.manual_seed(0)
    layer = _randomise(LAYERS[variant](num_kv_heads=kv, causal=causal, rope=rope, bias=cross, depth=3,
                                       kernel="eager")).double()
    x = torch.randn(2, 6, 48, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(2, 6 if causal else 9, 48, dtype=torch.float64, requires_grad=True) if cross else None
    s = (mem if cross else x).shape[1]
    kpm = None
    if padding:
        kpm = torch.zeros(2, s, dtype=torch.bool)
        kpm[0, -2:] = True  # two padded keys in row 0
        if not causal:
            kpm[1, :] = True  # row 1: every key padded: outputs must be zeros, not NaN
    out, _ = layer(x, mem, mem, key_padding_mask=kpm)
    ref = reference(layer, x, mem if cross else x, mem if cross else x, causal=causal, kpm=kpm)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()
    g = torch.randn_like(out)
    leaves = [x] + ([mem] if cross else []) + list(layer.parameters())
    got = torch.autograd.grad((out * g).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), leaves, allow_unused=True)
    for a, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-10)


def test_padded_keys_do_not_change_other_outputs():
    torch.manual_seed(1)
    layer = dnn.DiffAttention(32, 2, kernel="sdpa").eval()
    x = torch.randn(1, 5, 32)
    pad = torch.randn(1, 3, 32)
    kpm = torch.tensor([[False] * 5 + [True] * 3])
    alone, _ = layer(x)
    padded, _ = layer(x, torch.cat([x, pad], 1), torch.cat([x, pad * 100], 1), key_padding_mask=kpm)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["standard", "diff_v1", "diff_v2", "shared_diff"])
def test_need_weights_gives_the_effective_signed_map_and_components(variant):
    torch.manual_seed(2)
    layer = _randomise(LAYERS[variant]()).eval()
    x = torch.randn(2, 5, 48)
    out, maps = layer(x, need_weights=True)  # the sdpa kernel cannot return maps: the call uses eager
    out2, none = layer(x)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-6)
    assert none is None and maps.effective.shape == (2, 4, 5, 5)
    if variant == "standard":
        assert maps.components is None
        torch.testing.assert_close(maps.effective.sum(-1), torch.ones(2, 4, 5))
    else:
        p1, p2 = maps.components[:, :, 0], maps.components[:, :, 1]
        with torch.no_grad():
            if variant == "diff_v2":  # λ per token and head: sigmoid(x·W_λ), (B, H, T, 1)
                lam = torch.sigmoid(x @ layer.lambda_proj.weight.T).transpose(1, 2)[..., None]
            else:
                lam = layer.lambda_full()
        torch.testing.assert_close(maps.effective, p1 - lam * p2)
        torch.testing.assert_close(maps.effective.sum(-1, keepdim=True), (1 - lam).expand(2, 4, 5, 1))  # signed rows


@pytest.mark.parametrize("variant", ["standard", "diff_v1", "diff_v2", "shared_diff"])
@pytest.mark.parametrize("causal,padding", [(False, False), (True, False), (False, True)])
def test_eager_equals_sdpa(variant, causal, padding):
    torch.manual_seed(3)
    eager = _randomise(LAYERS[variant](kernel="eager", causal=causal, rope=10000.0, num_kv_heads=2))
    sdpa = LAYERS[variant](kernel="sdpa", causal=causal, rope=10000.0, num_kv_heads=2)
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randn(2, 7, 48)
    kpm = torch.tensor([[False] * 5 + [True] * 2, [False] * 7]) if padding else None
    a, _ = eager(x, key_padding_mask=kpm)
    b, _ = sdpa(x, key_padding_mask=kpm)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_functional_core_matches_the_equation_and_takes_gqa_and_masks():
    torch.manual_seed(4)
    q1, q2 = torch.randn(2, 4, 5, 8, dtype=torch.float64), torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k1, k2 = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 2, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 16, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    lam = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def ref():
        kr1, kr2, vr = (z.repeat_interleave(2, dim=1) for z in (k1, k2, v))
        a1 = torch.softmax((q1 @ kr1.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf")), -1)
        a2 = torch.softmax((q2 @ kr2.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf")), -1)
        return (a1 - lam * a2) @ vr

    for kernel in ("eager", "sdpa"):
        out = differential_attention(q1, q2, k1, k2, v, lam, attn_mask=mask, kernel=kernel)
        torch.testing.assert_close(out, ref(), rtol=1e-10, atol=1e-10)
    (gl,) = torch.autograd.grad(differential_attention(q1, q2, k1, k2, v, lam, kernel="sdpa").sum(), [lam])
    assert gl.abs() > 0  # λ keeps its gradient
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        differential_attention(q1, q2, k1, k2, v, 0.5, attn_mask=mask.float())


def test_torch_compile_of_a_layer_runs_and_matches():
    torch.manual_seed(5)
    layer = dnn.DiffAttention(32, 2, causal=True, rope=10000.0).eval()
    x = torch.randn(2, 6, 32)
    want, _ = layer(x)
    compiled = torch.compile(layer, backend="eager")
    got, _ = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2", "shared_diff"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_replace_attention_in_a_transformer_encoder_trains_and_reports(variant, batch_first):
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(48, 6, 96, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.Embedding(20, 48), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(48, 3))
    done = dnn.replace_attention(model, variant)
    assert [r.name for r in done] == ["1.layers.0.self_attn", "1.layers.1.self_attn"]
    assert all(isinstance(m, dnn.layer_class(variant)) for m in model.modules() if hasattr(m, "lambda_init")
               or isinstance(m, dnn.DiffAttentionV2))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    heads = {"diff_v1": 3, "shared_diff": 3, "diff_v2": 4}[variant]
    assert all(r.num_heads == 6 and r.new_num_heads == heads for r in done)
    if variant == "diff_v1":  # the matched layer has the baseline's projections plus λ and norm gains
        assert done[0].params_after == done[0].params_before + 4 * 8 + 2 * 8  # + λ vectors (4d) + norm gain (2d)
    ids = torch.randint(0, 20, (4, 9))
    pad = torch.zeros(4, 9, dtype=torch.bool)
    pad[0, -3:] = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]

    def run():
        x = ids if batch_first else ids.T
        h = model[1](model[0](x), src_key_padding_mask=pad)
        return model[2](h if batch_first else h.transpose(0, 1)).mean(1)

    loss = nn.functional.cross_entropy(run(), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(run()).all()  # eval mode: nn.TransformerEncoder's fast path is not taken for us
    assert dnn.replace_attention(model, variant) == []  # nothing left to replace


@pytest.mark.parametrize("make,match", [
    (lambda: dnn.DiffAttention(50, 4), "embed_dim=50 is not divisible by 2\\*num_heads=8"),
    (lambda: dnn.DiffAttention(48, 0), "num_heads must be an integer >= 1"),
    (lambda: dnn.MultiheadAttention(48, 4, num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
    (lambda: dnn.DiffAttentionV2(48, 4, lambda_init=0.5), "lambda_init applies to DIFF V1"),
    (lambda: dnn.DiffAttention(48, 4, kernel="flash"), "kernel must be one of"),
    (lambda: dnn.DiffAttention(48, 4, dropout=1.5), "dropout must be in"),
    (lambda: dnn.DiffAttention(48, 4, rope=True), "rope must be None or a rotary base"),
    (lambda: dnn.DiffAttention(48, 4, lambda_init=1.5), "lambda_init: must be"),
    (lambda: dnn.DiffAttentionV2.matched(48, 4), "no parameter-matched DiffAttentionV2"),
])
def test_bad_arguments_raise_value_errors_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_masks_and_inputs_raise_value_errors():
    layer = dnn.DiffAttention(32, 2)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        layer(x, attn_mask=torch.zeros(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be bool or float"):
        layer(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="additive biases are not supported"):
        layer(x, attn_mask=torch.full((5, 5), 0.5))
    with pytest.raises(ValueError, match="query must have shape"):
        layer(torch.randn(2, 5, 30))
    float_mask = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(layer(x, attn_mask=float_mask)[0], layer(x, is_causal=True)[0])  # -inf = blocked


@pytest.mark.parametrize("variant", ["standard", "diff_v1", "diff_v2", "shared_diff"])
def test_the_layers_are_the_decoders_implementation(variant):
    """A drop-in layer and the decoder's attention module with the same weights compute the same thing."""
    torch.manual_seed(7)
    layer = _randomise(LAYERS[variant](causal=True, rope=10000.0, num_kv_heads=2, depth=1)).eval()
    extra = {"shared_rank": layer.config.shared_rank, "shared_init": "random"} if variant == "shared_diff" else {}
    cfg = ModelConfig(attention=variant, vocab_size=8, d_model=48, n_layer=2, n_head=4, n_kv_head=2,
                      head_dim=layer.head_dim, **extra)
    dec = build_attention(cfg, 1).eval()
    dec.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 48)
    rope = Rotary(torch.arange(6).expand(2, 6), layer.head_dim, 10000.0, x.dtype)
    want, _ = dec(x, rope, mask=None, is_causal=True)
    got, _ = layer(x)
    # bitwise: the layer runs the decoder's own forward pieces on the same tensors with the same kernel, in one
    # process at one thread count, so the same operations in the same order on any CPU
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dropout_applies_in_training_only():
    torch.manual_seed(8)
    layer = dnn.DiffAttention(32, 2, dropout=0.5)
    x = torch.randn(2, 5, 32)
    a, _ = layer(x)
    b, _ = layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])

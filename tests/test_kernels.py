"""The attention kernels (src/diffattn/model/kernels.py): every kernel equals the eager reference, forward and
gradients, for every variant (float64); the raw kernel contract and its errors; the eager maps are the effective
differential maps; and ``sdpa_differential``, the CPU path chosen by the benchmarks (both DIFF maps in one padded
flash call, custom backward), equals the two-call eager reference, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffattn import ATTENTION_VARIANTS, ModelConfig, build_model
from diffattn.model import kernels
from diffattn.model.kernels import KERNELS, eager_attention, sdpa_attention, sdpa_differential
from helpers import assert_same_outputs_and_grads  # tests/helpers.py


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@st.composite
def model_shapes(draw):
    attention = draw(st.sampled_from(ATTENTION_VARIANTS))
    n_kv = draw(st.integers(1, 3))
    n_head = n_kv * draw(st.integers(1, 3))  # GQA groups of 1..3
    head_dim = draw(st.sampled_from([2, 4, 8]))
    extra = {}
    if attention == "shared_diff":
        extra["shared_rank"] = draw(st.integers(1, min(4, n_head * head_dim)))
        extra["shared_init"] = "random"
    return dict(attention=attention, n_head=n_head, n_kv_head=n_kv, head_dim=head_dim,
                d_model=draw(st.sampled_from([8, 12, 16])), **extra), draw(st.integers(1, 13)), draw(st.integers(1, 3))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)  # same examples every run
@given(model_shapes(), st.integers(0, 2**31 - 1))
def test_sdpa_equals_eager_forward_and_backward_float64(shape, seed):
    kw, t, b = shape
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=13, n_layer=2, max_seq_len=32, kernel="eager", **kw)
    eager = build_model(cfg).double()
    sdpa = build_model(cfg.replace(kernel="sdpa")).double()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 13, (b, t))
    out_e, out_s = eager(ids), sdpa(ids)
    assert rel_err(out_s, out_e) < 1e-10
    g = torch.randn_like(out_e)
    (out_e * g).sum().backward()
    (out_s * g).sum().backward()
    # a gradient that is zero in exact arithmetic (e.g. the queries of a 2-token sequence) is rounding noise
    # in both kernels: judge those on the scale of the model's largest gradient instead
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, pe), ps in zip(eager.named_parameters(), sdpa.parameters()):
        assert rel_err(ps.grad, pe.grad) < 1e-10 or (ps.grad - pe.grad).abs().max() < 1e-12 * scale, name


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("t,s,mask_kind", [(5, 5, "causal"), (1, 6, "none"), (3, 7, "explicit")])
def test_kernel_contract(name, t, s, mask_kind):
    """Raw kernel calls: GQA head mapping, dv = 2·d (split-value), masks, against a manual computation."""
    torch.manual_seed(1)
    q = torch.randn(2, 4, t, 8, dtype=torch.float64)
    k = torch.randn(2, 2, s, 8, dtype=torch.float64)
    v = torch.randn(2, 2, s, 16, dtype=torch.float64)
    mask = None
    if mask_kind == "explicit":
        mask = torch.rand(2, 1, t, s) > 0.3
        mask[..., -1] = True
    out, _ = KERNELS[name](q, k, v, mask=mask, is_causal=mask_kind == "causal", scale=0.3)
    for bi in range(2):
        for h in range(4):
            kv = h // 2
            scores = q[bi, h] @ k[bi, kv].T * 0.3
            if mask_kind == "causal":
                scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool).triu(1), float("-inf"))
            elif mask is not None:
                scores = scores.masked_fill(~mask[bi, 0], float("-inf"))
            torch.testing.assert_close(out[bi, h], torch.softmax(scores, -1) @ v[bi, kv], rtol=1e-12, atol=1e-12)


def test_kernel_errors():
    q, k, v = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        eager_attention(q, k, v, scale=1.0)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cannot return attention maps"):
        sdpa_attention(q, k, v, scale=1.0, need_weights=True)
    with pytest.raises(ValueError, match="is_causal without a mask"):
        sdpa_attention(q[:, :, :2], k, v, scale=1.0, is_causal=True)
    with pytest.raises(ValueError, match="not a multiple"):
        sdpa_attention(q, k, torch.randn(1, 2, 4, 12), scale=1.0)


def test_eager_maps_are_the_effective_differential_maps():
    torch.manual_seed(0)
    for attention in ("diff_v1", "diff_v2", "standard"):
        cfg = ModelConfig(attention=attention, vocab_size=13, d_model=16, n_layer=2, n_head=2, kernel="eager")
        model = build_model(cfg).double()
        ids = torch.randint(0, 13, (1, 6))
        logits, maps = model(ids, return_maps=True)
        assert len(maps) == 2
        for blk, m in zip(model.layers, maps):
            assert m.effective.shape == (1, cfg.n_head, 6, 6)
            if attention == "standard":
                assert m.components is None
                torch.testing.assert_close(m.effective.sum(-1), torch.ones(1, 2, 6, dtype=torch.float64))
            elif attention == "diff_v1":
                lam = blk.attn.lambda_full()
                torch.testing.assert_close(m.effective, m.components[:, :, 0] - lam * m.components[:, :, 1])
                # rows of A1 − λA2 sum to 1 − λ
                torch.testing.assert_close(m.effective.sum(-1), (1 - lam).expand(1, 2, 6))
            # strictly causal: nothing above the diagonal
            assert m.effective.triu(1).abs().max() == 0
        with pytest.raises(ValueError, match="kernel='eager'"):
            build_model(cfg.replace(kernel="sdpa"))(ids, return_maps=True)


# ------------------------------------------------------------------------ sdpa_differential: the CPU path
def two_calls(q1, q2, k1, k2, v, lam, *, is_causal, mask=None, scale):
    a1 = eager_attention(q1, k1, v, mask=mask, is_causal=is_causal, scale=scale)[0]
    a2 = eager_attention(q2, k2, v, mask=mask, is_causal=is_causal, scale=scale)[0]
    return a1 - lam.to(a1.dtype) * a2


@pytest.mark.parametrize("dtype,floor", [(torch.float64, 1e-13), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("b,h,hkv,t,s,d,causal", [
    (2, 4, 2, 9, 9, 8, True),  # GQA, causal
    (1, 3, 1, 7, 7, 16, True),  # one K/V head for three query heads
    (2, 2, 2, 1, 6, 8, False),  # a decode step against a cache
    (1, 4, 2, 5, 8, 2, False),  # several queries, every key visible; head_dim 2
])
def test_equals_two_call_reference(dtype, floor, b, h, hkv, t, s, d, causal):
    """Error against the float64 truth is within 4x that of the two-call path in the same dtype
    (float64: equal to rounding)."""
    g = torch.Generator().manual_seed(t * 31 + d)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    inputs = (mk(b, h, t, d), mk(b, h, t, d), mk(b, hkv, s, d), mk(b, hkv, s, d), mk(b, hkv, s, 2 * d),
              torch.tensor(0.45, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True))
    exact = [x.detach().double().requires_grad_() for x in inputs]
    out = sdpa_differential(*inputs, is_causal=causal, scale=0.3)
    ref = two_calls(*inputs, is_causal=causal, scale=0.3)
    truth = two_calls(*exact, is_causal=causal, scale=0.3)
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731
    assert rel(out, truth) <= 4 * rel(ref, truth) + floor
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    two = torch.autograd.grad(ref, inputs, grad.to(dtype))
    want = torch.autograd.grad(truth, exact, grad)
    for name, a, r, w in zip(("q1", "q2", "k1", "k2", "v", "λ"), got, two, want):
        assert rel(a, w) <= 4 * rel(r, w) + floor, name
    with torch.no_grad():  # the inference branch (no custom autograd) gives the same output
        assert rel(sdpa_differential(*inputs, is_causal=causal, scale=0.3), truth) <= 4 * rel(ref, truth) + floor


def test_declines_explicit_masks():
    q = torch.randn(1, 2, 4, 8)
    v = torch.randn(1, 2, 4, 16)
    assert sdpa_differential(q, q, q, q, v, torch.tensor(0.5), mask=torch.ones(4, 4, dtype=torch.bool), scale=1.0) is None


@pytest.mark.parametrize("attention", ["diff_v1", "shared_diff"])
def test_model_uses_it_and_matches_the_split_value_path(attention, monkeypatch):
    """kernel='sdpa' DIFF models go through sdpa_differential, and equal the previous split-value
    path (two SDPA calls per map) to float64 rounding, logits and every gradient."""
    extra = dict(shared_init="random", shared_rank=2) if attention == "shared_diff" else {}
    cfg = ModelConfig(attention=attention, vocab_size=37, d_model=32, n_layer=2, n_head=2, n_kv_head=1,
                      kernel="sdpa", **extra)
    torch.manual_seed(0)
    fused = build_model(cfg).double()
    split = build_model(cfg).double()
    split.load_state_dict(fused.state_dict())
    # the split-value path: two kernel calls, then A1 − λ·A2 (a kernel without a fused differential entry)
    split.set_kernel(kernels.FunctionKernel("split-value", kernels.sdpa_attention))
    calls = []
    real = kernels.sdpa_differential
    fused.set_kernel(kernels.FunctionKernel("spy", kernels.sdpa_attention,
                                            lambda *a, **kw: calls.append(1) or real(*a, **kw)))
    ids = torch.randint(0, 37, (2, 13))
    assert_same_outputs_and_grads(fused, split, ids, out_tol=(1e-12, 1e-12), grad_tol=(1e-9, 1e-15))
    assert len(calls) == cfg.n_layer  # the fused entry served every layer's forward

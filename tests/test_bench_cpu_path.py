"""The CPU path chosen by the benchmarks (kernels.sdpa_differential: both DIFF maps in one padded
flash call, custom backward) equals the two-call eager reference, forward and backward.
Run: .venv/bin/python -m pytest tests/test_bench_cpu_path.py -q
"""

import pytest
import torch

from diffattn import ModelConfig, build_model
from diffattn.model import kernels
from diffattn.model.kernels import eager_attention, sdpa_differential


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
    out_f, out_s = fused(ids), split(ids)
    assert len(calls) == cfg.n_layer
    torch.testing.assert_close(out_f, out_s, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out_s)
    (out_f * g).sum().backward()
    (out_s * g).sum().backward()
    for (name, pf), ps in zip(fused.named_parameters(), split.parameters()):
        torch.testing.assert_close(pf.grad, ps.grad, rtol=1e-9, atol=1e-15, msg=name)

"""Every kernel equals the eager reference, forward and gradients, for every variant (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffattn import ATTENTION_VARIANTS, ModelConfig, build_model
from diffattn.model.kernels import KERNELS, eager_attention, sdpa_attention


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

"""The attention variants (src/diffattn/model/attention.py): each variant equals a direct transcription of
its paper's equations, written here with explicit loops; the λ initialisation schedule and its fp32 storage.

The transcriptions below share no code with the package: rotary, softmax, causal masking, the
GQA pairing, λ and the per-head norm are written from ../shared/reference/methods.md (§1.2-1.5
for DIFF V1, §2.2 for DIFF V2, §3.3 for Shared DIFF).
"""

import math

import pytest
import torch

from diffattn import ModelConfig
from diffattn.model.attention import build_attention
from diffattn.model.layers import Rotary


def ref_rope(x, theta):
    """Interleaved (GPT-J) rotary on (T, d): pairs (2i, 2i+1) rotated by p·θ^(−2i/d)."""
    t, d = x.shape
    out = x.clone()
    for p in range(t):
        for i in range(d // 2):
            ang = p * theta ** (-2 * i / d)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[p, 2 * i].item(), x[p, 2 * i + 1].item()
            out[p, 2 * i] = a * c - b * s
            out[p, 2 * i + 1] = a * s + b * c
    return out


def ref_causal_softmax(q, k, scale):
    """softmax(q kᵀ·scale) with −inf above the diagonal; q (T, d), k (T, d)."""
    t = q.shape[0]
    s = (q @ k.T) * scale
    s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(s, dim=-1)


def rows(w, start, n):
    """Rows [start, start+n) of an nn.Linear weight (out_features x in_features)."""
    return w[start:start + n]


def ref_standard(x, attn, cfg):
    d, h, hkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    n_rep = h // hkv
    heads = []
    for i in range(h):
        kv = i // n_rep
        q = ref_rope(x @ rows(attn.q_proj.weight, i * d, d).T, cfg.rope_theta)
        k = ref_rope(x @ rows(attn.k_proj.weight, kv * d, d).T, cfg.rope_theta)
        v = x @ rows(attn.v_proj.weight, kv * d, d).T
        heads.append(ref_causal_softmax(q, k, d ** -0.5) @ v)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


def ref_lambda(attn, depth, cfg):
    lam_init = cfg.lambda_init if isinstance(cfg.lambda_init, float) else 0.8 - 0.6 * math.exp(-0.3 * depth)
    lq1, lk1, lq2, lk2 = (getattr(attn, n).double() for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
    return math.exp((lq1 * lk1).sum().item()) - math.exp((lq2 * lk2).sum().item()) + lam_init, lam_init


def ref_diff_v1(x, attn, cfg, depth, qk=None):
    """Eq. 1-3 per DIFF head. ``qk(component, head)`` returns the (Q_c, K_c) projections, pre-rotary."""
    d, h, hkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    n_rep = h // hkv
    lam, lam_init = ref_lambda(attn, depth, cfg)
    heads = []
    for i in range(h):
        kv = i // n_rep  # flash semantics: component c of head i meets key component c of KV head ⌊i/n_rep⌋
        if qk is None:  # interleaved sub-heads: q sub-head 2i+c, k sub-head 2kv+c
            q1 = x @ rows(attn.q_proj.weight, (2 * i) * d, d).T
            q2 = x @ rows(attn.q_proj.weight, (2 * i + 1) * d, d).T
            k1 = x @ rows(attn.k_proj.weight, (2 * kv) * d, d).T
            k2 = x @ rows(attn.k_proj.weight, (2 * kv + 1) * d, d).T
        else:
            (q1, k1), (q2, k2) = qk(0, i, kv), qk(1, i, kv)
        q1, q2, k1, k2 = (ref_rope(t, cfg.rope_theta) for t in (q1, q2, k1, k2))
        v = x @ rows(attn.v_proj.weight, kv * 2 * d, 2 * d).T  # both components share the 2d-wide value
        a1, a2 = ref_causal_softmax(q1, k1, d ** -0.5), ref_causal_softmax(q2, k2, d ** -0.5)
        head = (a1 - lam * a2) @ v
        if cfg.diff_norm:
            g = attn.head_norm.weight if cfg.diff_norm_affine else 1.0
            head = head / torch.sqrt((head ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * g
        heads.append((1 - lam_init) * head)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


def ref_shared_diff(x, attn, cfg, depth):
    d, r = cfg.head_dim, cfg.shared_rank

    def qk(c, i, kv):
        # W_c = W_base + A_c B_c, restricted to the rows of head i (queries) / KV head kv (keys)
        wq = attn.q_base.weight.T + attn.q_down.weight[c * r:(c + 1) * r].T @ attn.q_up[c]
        wk = attn.k_base.weight.T + attn.k_down.weight[c * r:(c + 1) * r].T @ attn.k_up[c]
        return x @ wq[:, i * d:(i + 1) * d], x @ wk[:, kv * d:(kv + 1) * d]

    return ref_diff_v1(x, attn, cfg, depth, qk=qk)


def ref_diff_v2(x, attn, cfg):
    d, h, hkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    group = 2 * h // hkv  # query heads per KV head
    lam = torch.sigmoid(x @ attn.lambda_proj.weight.T)  # (T, h), per token and head
    ctx = []
    for j in range(2 * h):
        kv = j // group
        q = ref_rope(x @ rows(attn.q_proj.weight, j * d, d).T, cfg.rope_theta)
        k = ref_rope(x @ rows(attn.k_proj.weight, kv * d, d).T, cfg.rope_theta)
        v = x @ rows(attn.v_proj.weight, kv * d, d).T
        ctx.append(ref_causal_softmax(q, k, d ** -0.5) @ v)
    outs = [ctx[2 * i] - lam[:, i:i + 1] * ctx[2 * i + 1] for i in range(h)]  # head 2i paired with 2i+1
    return torch.cat(outs, dim=-1) @ attn.o_proj.weight.T


CASES = [
    ("standard", dict(n_head=4, n_kv_head=4)),
    ("standard", dict(n_head=4, n_kv_head=2)),
    ("diff_v1", dict(n_head=4, n_kv_head=4)),
    ("diff_v1", dict(n_head=4, n_kv_head=2)),  # GQA n_rep=2: where the naive reference file differs
    ("diff_v1", dict(n_head=4, n_kv_head=1, lambda_init=0.5)),
    ("diff_v1", dict(n_head=2, n_kv_head=2, diff_norm_affine=False)),
    ("diff_v1", dict(n_head=2, n_kv_head=1, diff_norm=False, diff_norm_affine=False)),
    ("diff_v2", dict(n_head=4, n_kv_head=4)),
    ("diff_v2", dict(n_head=4, n_kv_head=2)),
    ("shared_diff", dict(n_head=2, n_kv_head=1, shared_rank=3)),
    ("shared_diff", dict(n_head=2, n_kv_head=2, shared_rank=2, shared_init="random")),
]


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("attention,kw", CASES)
def test_variant_matches_transcribed_equations(attention, kw, kernel):
    torch.manual_seed(0)
    depth = 3
    cfg = ModelConfig(attention=attention, vocab_size=11, d_model=32, n_layer=4, head_dim=8, kernel=kernel, **kw)
    attn = build_attention(cfg, depth).double()
    with torch.no_grad():  # make every parameter non-trivial (B = 0 and gains = 1 would hide mistakes)
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    t = 7
    x = torch.randn(t, cfg.d_model, dtype=torch.float64)
    rope = Rotary(torch.arange(t)[None], cfg.head_dim, cfg.rope_theta, torch.float64)
    out, _ = attn(x[None], rope)
    ref = {
        "standard": lambda: ref_standard(x, attn, cfg),
        "diff_v1": lambda: ref_diff_v1(x, attn, cfg, depth),
        "shared_diff": lambda: ref_shared_diff(x, attn, cfg, depth),
        "diff_v2": lambda: ref_diff_v2(x, attn, cfg),
    }[attention]()
    torch.testing.assert_close(out[0], ref.detach(), rtol=1e-10, atol=1e-10)


def test_lambda_init_depth_schedule_and_fp32():
    from diffattn.config import lambda_init_for_depth

    expected = [0.200, 0.356, 0.471, 0.556, 0.619, 0.666, 0.701, 0.727]  # methods.md §1.3
    for depth, value in enumerate(expected):
        assert lambda_init_for_depth(depth) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * depth), abs=1e-15)
        assert round(lambda_init_for_depth(depth), 3) == value
    cfg = ModelConfig(attention="diff_v1", vocab_size=11, d_model=32, n_layer=8, n_head=2)
    from diffattn import build_model

    model = build_model(cfg)
    assert [blk.attn.lambda_init for blk in model.layers] == [lambda_init_for_depth(i) for i in range(8)]
    model = model.to(torch.bfloat16)
    for blk in model.layers:
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            assert getattr(blk.attn, name).dtype == torch.float32  # λ stays fp32 under a bf16 cast
        assert blk.attn.lambda_full().dtype == torch.float32
        assert blk.attn.q_proj.weight.dtype == torch.bfloat16
    # the λ vectors are initialised N(0, 0.1²)
    big = build_model(cfg.replace(head_dim=1024, d_model=64))
    lam = torch.cat([getattr(b.attn, n).detach() for b in big.layers for n in ("lambda_q1", "lambda_k2")])
    assert lam.std().item() == pytest.approx(0.1, rel=0.05) and abs(lam.mean().item()) < 0.01
    const = build_model(cfg.replace(lambda_init=0.8))
    assert all(b.attn.lambda_init == 0.8 for b in const.layers)

"""The attention functions the kernel objects (kernels.py) are made of: eager softmax attention (the only one that
returns maps and takes a logit hook) and PyTorch SDPA, plus SDPA's fused differential path on CPU. Shapes and the
masking convention: kernels.py's docstring. A leaf of the model package: kernels.py and the Triton kernel's
fallback (triton_diff.py) both call it, and it imports neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import compute_dtype


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, is_causal: bool) -> None:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    if mask is None and is_causal and q.shape[2] != k.shape[2]:
        raise ValueError("is_causal without a mask needs as many queries as keys; pass an explicit mask")
    if v.shape[-1] % q.shape[-1]:
        raise ValueError(f"value width {v.shape[-1]} is not a multiple of query/key width {q.shape[-1]}")


def eager_attention(q, k, v, *, mask=None, is_causal=True, scale, need_weights=False, logits_hook=None,
                    dropout_p=0.0):
    """Reference kernel: materialises the (B, Hq, T, S) maps; softmax in fp32 (fp64 for fp64 inputs).

    ``logits_hook(scores, allowed)``, when given, sees the fp32 logits QKᵀ·scale (B, Hq, T, S) and the boolean
    "may attend" mask (broadcastable to them) before the softmax, and may return replacement logits (the
    evaluation probes: quantised logits, outlier statistics). Returning None changes nothing.
    """
    _check(q, k, v, mask, is_causal)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # query head j -> K/V head j // n_rep
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    acc = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, Hq, T, S)
    t, s = scores.shape[-2:]
    if mask is None and is_causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)[None, None]  # = tril() as T == S
    if logits_hook is not None:
        allowed = mask if mask is not None else torch.ones(1, 1, t, s, dtype=torch.bool, device=q.device)
        new = logits_hook(scores, allowed)
        if new is not None:
            scores = new
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    dropped = torch.nn.functional.dropout(probs, dropout_p) if dropout_p else probs  # the returned maps: before it
    out = torch.matmul(dropped.to(v.dtype), v)
    return out, (probs if need_weights else None)


def sdpa_attention(q, k, v, *, mask=None, is_causal=True, scale, need_weights=False, dropout_p=0.0):
    """torch's fused scaled_dot_product_attention; never materialises T×S maps itself.

    DIFF V1 values are wider than queries (dv = 2·d), which the fused SDPA back ends do not
    accept; the *split-value trick* computes softmax(QKᵀ)[V₁ | V₂] as [softmax(QKᵀ)V₁ |
    softmax(QKᵀ)V₂], two calls with dv = d, so the fused kernels stay eligible (the approach of
    the authors' ``multihead_flashdiff_2.py``).
    """
    if need_weights:
        raise ValueError("kernel 'sdpa' cannot return attention maps; use kernel='eager' for analysis")
    _check(q, k, v, mask, is_causal)
    gqa = q.shape[1] != k.shape[1]
    causal = is_causal and mask is None

    def call(v_part):
        return F.scaled_dot_product_attention(q, k, v_part, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                              scale=scale, enable_gqa=gqa)

    d = q.shape[-1]
    if v.shape[-1] == d:
        return call(v), None
    return torch.cat([call(part) for part in v.split(d, dim=-1)], dim=-1), None


def save_differential(ctx, inputs, out, second, lse, causal: bool, scale: float) -> None:
    """What a fused differential backward needs, in the order it unpacks ``ctx.saved_tensors``: the inputs
    (q1, q2, k1, k2, v, λ), the output, the second map's A2·V and the log-sum-exp rows; ``causal``, ``scale``.
    The CPU path here and the Triton kernel (triton_diff.py) both save this way."""
    ctx.save_for_backward(*inputs, out, second, lse)
    ctx.causal, ctx.scale = causal, scale


def _stack_padded(q1, q2, k1, k2, v):
    """Both maps as one attention over 2H query heads: Q = [Q1; Q2], K = [K1; K2] (component-major,
    so query head c·H + h meets K/V head c·Hkv + ⌊h/n_rep⌋, the GQA rule j // n_rep), zero-padded
    from d to the value width dv (2d for DIFF V1) so that the fused kernels, which need equal q/k/v
    widths, accept V = [V; V]."""
    (b, h, t, d), (hkv, s), dv = q1.shape, k1.shape[1:3], v.shape[-1]
    q = q1.new_zeros(b, 2 * h, t, dv)
    q[:, :h, :, :d], q[:, h:, :, :d] = q1, q2
    k = k1.new_zeros(b, 2 * hkv, s, dv)
    k[:, :hkv, :, :d], k[:, hkv:, :, :d] = k1, k2
    return q, k, torch.cat([v, v], dim=1)


class _SdpaDifferentialCPU(torch.autograd.Function):
    """(A1 − λ·A2)·V as ONE call of torch's CPU flash kernel (see :func:`sdpa_differential`).

    Saves only q1, q2, k1, k2, v (alive anyway), the combined output (which the per-head norm saves
    too), A2·V and the row log-sum-exps; the padded tensors are rebuilt in backward, and A1·V is
    recovered as out + λ·A2·V. So the layer keeps about as much for backward as a standard layer.
    """

    @staticmethod
    def forward(ctx, q1, q2, k1, k2, v, lam, causal, scale):
        h = q1.shape[1]
        q, k, vv = _stack_padded(q1, q2, k1, k2, v)
        a, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, vv, 0.0, causal, scale=scale)
        a2 = a[:, h:].clone()  # (B, H, T, 2d); the clone lets `a` (2H heads) be freed
        out = a[:, :h] - lam.to(a.dtype) * a2
        save_differential(ctx, (q1, q2, k1, k2, v, lam), out, a2, lse, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q1, q2, k1, k2, v, lam, out, a2, lse = ctx.saved_tensors
        (h, d), hkv = q1.shape[1::2], k1.shape[1]
        lam_c = lam.to(out.dtype)
        q, k, vv = _stack_padded(q1, q2, k1, k2, v)
        a = torch.cat([out + lam_c * a2, a2], dim=1)  # [A1·V; A2·V]
        dout = dout.contiguous()
        da = torch.cat([dout, -lam_c * dout], dim=1)  # d(A1·V) = dout, d(A2·V) = −λ·dout
        dq, dk, dvv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            da, q, k, vv, a, lse, 0.0, ctx.causal, scale=ctx.scale)
        dlam = -(dout.to(lam.dtype) * a2.to(lam.dtype)).sum()
        return (dq[:, :h, :, :d], dq[:, h:, :, :d], dk[:, :hkv, :, :d], dk[:, hkv:, :, :d],
                dvv[:, :hkv] + dvv[:, hkv:], dlam, None, None)


def _decode_differential(q1, q2, k1, k2, v, lam, scale):
    """One query row against S cached keys: the (B, H, 1, S) maps are tiny, so combine them first and
    make ONE matmul with the 2d-wide V (the padded path would copy the whole cache every step).
    GQA without copies: the n_rep query heads of a K/V head are the rows of one matmul."""
    b, h, _, d = q1.shape
    hkv = k1.shape[1]
    acc = compute_dtype(q1.dtype)

    def probs(q, k):  # (B, Hkv, n_rep, S), softmax in fp32 (fp64 for fp64)
        s = torch.matmul(q.reshape(b, hkv, h // hkv, d), k.transpose(-1, -2)).to(acc) * scale
        return torch.softmax(s, dim=-1)

    p = probs(q1, k1) - lam.to(acc) * probs(q2, k2)  # the signed differential map A1 − λ·A2
    return torch.matmul(p.to(v.dtype), v).reshape(b, h, 1, v.shape[-1])


def sdpa_differential(q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale):
    """CPU: both DIFF maps in one fused SDPA call instead of the split-value trick's four.

    Stacking the two maps as 2H heads and zero-padding Q/K to the value width, 2d for DIFF V1 (exact: the
    padded channels add 0 to every score; the scale stays 1/√d) runs ONE flash call with V: one softmax per
    map instead of two, a quarter of the calls. Measured faster than the split-value path at the
    issue's CPU target shape (docs/benchmarks.md). Returns None — the variant then makes its two
    split-value calls — for an explicit mask and off CPU (on GPU, ``triton`` is the fused path).
    A single query row without autograd (a decode step) takes :func:`_decode_differential`.
    """
    if mask is not None or q1.device.type != "cpu":
        return None
    causal = bool(is_causal) and q1.shape[2] > 1
    if causal and q1.shape[2] != k1.shape[2]:
        raise ValueError("is_causal without a mask needs as many queries as keys; pass an explicit mask")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q1, q2, k1, k2, v, lam)):
        return _SdpaDifferentialCPU.apply(q1, q2, k1, k2, v, lam, causal, scale)
    if q1.shape[2] == 1:
        return _decode_differential(q1, q2, k1, k2, v, lam, scale)
    h = q1.shape[1]
    a, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_stack_padded(q1, q2, k1, k2, v), 0.0,
                                                                      causal, scale=scale)
    return a[:, :h] - lam.to(a.dtype) * a[:, h:]

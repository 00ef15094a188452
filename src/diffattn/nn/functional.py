"""The functional core of differential attention (issue #17), on the library's kernels.

    out = differential_attention(q1, q2, k1, k2, v, lam, attn_mask=None, is_causal=False, scale=None, kernel="sdpa")

computes (softmax(Q1K1ᵀ·s) − λ·softmax(Q2K2ᵀ·s))·V — Eq. 1 of the DIFF Transformer — with the same kernel objects
the decoder uses (eager, SDPA with the fused CPU path, the fused Triton kernel on GPU). It is the core only: no
per-head norm, no (1 − λ_init) (the layers in ``diffattn.nn`` add them).

Shapes: q1, q2 (B, Hq, T, d); k1, k2 (B, Hkv, S, d) with Hkv dividing Hq (grouped-query: query head j uses K/V
head j // (Hq/Hkv)); v (B, Hkv, S, dv) with dv a multiple of d; lam a scalar (float or 0-d tensor; a tensor keeps
its gradient). ``attn_mask`` follows ``torch.nn.functional.scaled_dot_product_attention``: a bool tensor
broadcastable to (B, Hq, T, S) where True means *may attend*. ``scale`` defaults to 1/√d.
"""

from __future__ import annotations

import torch

from ..model.kernels import get_kernel


def differential_attention(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
                           lam, *, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                           scale: float | None = None, kernel: str = "sdpa", dropout_p: float = 0.0) -> torch.Tensor:
    """(A1 − λ·A2)·V with the kernel named ``kernel`` (module docstring)."""
    if q1.shape != q2.shape or k1.shape != k2.shape:
        raise ValueError(f"q1/q2 and k1/k2 must have equal shapes, got {tuple(q1.shape)}/{tuple(q2.shape)} and "
                         f"{tuple(k1.shape)}/{tuple(k2.shape)}")
    if q1.dim() != 4 or k1.dim() != 4 or v.dim() != 4:
        raise ValueError("q1, q2, k1, k2 and v must be 4-D: (batch, heads, length, dim)")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}")
    if not torch.is_tensor(lam):
        lam = torch.tensor(float(lam), device=q1.device)
    if lam.dim() != 0:
        raise ValueError(f"lam must be a scalar (one λ per call), got shape {tuple(lam.shape)}")
    scale = q1.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = get_kernel(kernel).attend_differential(q1, q2, k1, k2, v, lam, mask=attn_mask, is_causal=is_causal,
                                                    scale=scale, dropout_p=dropout_p)
    return out


__all__ = ["differential_attention"]

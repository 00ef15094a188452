"""Attention kernels: how softmax(QKᵀ·scale)V is computed. A kernel is one :class:`AttentionKernel` object:

    kernel.attend(q, k, v, *, mask, is_causal, scale, need_weights) -> (out, weights | None)
    kernel.attend_differential(q1, q2, k1, k2, v, lam, *, mask, is_causal, scale, need_weights)
        -> (out, (weights1, weights2) | None)
    kernel.returns_maps: whether ``need_weights=True`` is served (only ``eager``)

    q: (B, Hq, T, d)     k: (B, Hkv, S, d)     v: (B, Hkv, S, dv)     out: (B, Hq, T, dv)

* Grouped-query attention: query head j uses K/V head ⌊j / (Hq/Hkv)⌋ (the flash-attn/SDPA rule).
* Masking: ``mask`` is a boolean "may attend" tensor broadcastable to (B, Hq, T, S), or ``None``.
  With ``mask=None``, ``is_causal=True`` means an ordinary causal mask and requires T == S;
  ``is_causal=False`` means every query sees every key (one decode step against a cache).
* ``dv`` may be a multiple of ``d`` (DIFF V1 values are 2·d wide).
* ``weights`` are the softmax maps (B, Hq, T, S); only the ``eager`` kernel can return them.

Variants call a kernel and never re-implement it; the differential algebra (λ, subtraction,
per-head norm) lives in the variants.

The differential entry point computes softmax(Q1K1ᵀ·scale)V − λ·softmax(Q2K2ᵀ·scale)V:

    q1, q2: (B, Hq, T, d)   k1, k2: (B, Hkv, S, d)   v: (B, Hkv, S, dv)   lam: 0-d   out: (B, Hq, T, dv)

Its default (written once, in :class:`AttentionKernel`) is two ``attend`` calls and the subtraction;
a kernel with a fused path overrides it and falls back to the default when the fused path cannot serve
the call (an explicit mask, maps requested). λ itself, the per-head norm and the (1 − λ_init) factor
stay in the variant. ``sdpa`` fuses both maps into one CPU flash call (:func:`sdpa_differential`);
``triton``'s plain entry is ``sdpa`` (standard and DIFF V2 attention are ordinary grouped-query
attention, which SDPA's flash back end already serves on GPU) and its differential entry is the fused
kernel of ``triton_diff.py``. Models select kernels with ``DecoderLM.set_kernel`` / ``using_kernel``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# The functions themselves live in attend.py (a leaf: the Triton fallback calls them too); re-exported here.
from .attend import eager_attention, sdpa_attention, sdpa_differential  # noqa: F401

Kernel = Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]


def triton_differential(q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale):
    """The fused Triton differential kernel; ``None`` for an explicit mask (see triton_diff.py)."""
    # Imported on first use: triton is optional, and TRITON_INTERPRET is read when the kernels are defined.
    from . import triton_diff

    return triton_diff.differential(q1, q2, k1, k2, v, lam, mask=mask, is_causal=is_causal, scale=scale)


DiffKernel = Callable[..., Optional[torch.Tensor]]


class AttentionKernel:
    """One way of computing attention: a plain entry point and a differential one (module docstring).

    Subclasses implement :meth:`attend`; they override :meth:`attend_differential` only to fuse the two maps
    (returning to ``super()`` when the fused path cannot serve a call).
    """

    name = "kernel"
    returns_maps = False  # whether need_weights=True is served
    fuses_differential = False  # whether attend_differential has a fused path (else two attend calls)

    def attend(self, q, k, v, *, mask=None, is_causal=True, scale, need_weights=False, dropout_p=0.0):
        raise NotImplementedError

    def attend_differential(self, q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale, need_weights=False,
                            dropout_p=0.0):
        """(A1 − λ·A2)·V: two ``attend`` calls and the subtraction (Eq. 1); maps (p1, p2) when asked.
        ``dropout_p``: dropout on the attention weights (each map its own mask), training only."""
        kw = dict(mask=mask, is_causal=is_causal, scale=scale, need_weights=need_weights)
        if dropout_p:
            kw["dropout_p"] = dropout_p
        a1, p1 = self.attend(q1, k1, v, **kw)
        a2, p2 = self.attend(q2, k2, v, **kw)
        return a1 - lam.to(a1.dtype) * a2, ((p1, p2) if need_weights else None)

    def __call__(self, q, k, v, **kwargs):  # a kernel object is also the plain attention function
        return self.attend(q, k, v, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FunctionKernel(AttentionKernel):
    """A kernel from functions: ``attend_fn`` (the plain signature) and optionally ``fused_fn``, a
    differential function that returns ``None`` when it cannot serve a call (then the default path runs)."""

    def __init__(self, name: str, attend_fn: Kernel, fused_fn: Optional[DiffKernel] = None, *,
                 returns_maps: bool = False):
        self.name, self.attend_fn, self.fused_fn, self.returns_maps = name, attend_fn, fused_fn, returns_maps
        self.fuses_differential = fused_fn is not None

    def attend(self, q, k, v, *, mask=None, is_causal=True, scale, need_weights=False, dropout_p=0.0):
        kw = {"dropout_p": dropout_p} if dropout_p else {}
        return self.attend_fn(q, k, v, mask=mask, is_causal=is_causal, scale=scale, need_weights=need_weights, **kw)

    def attend_differential(self, q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale, need_weights=False,
                            dropout_p=0.0):
        if self.fused_fn is not None and not need_weights and not dropout_p:  # fused: both maps in one pass
            out = self.fused_fn(q1, q2, k1, k2, v, lam, mask=mask, is_causal=is_causal, scale=scale)
            if out is not None:
                return out, None
        return super().attend_differential(q1, q2, k1, k2, v, lam, mask=mask, is_causal=is_causal, scale=scale,
                                           need_weights=need_weights, dropout_p=dropout_p)


# "triton": standard/V2 attention (and DIFF calls with an explicit mask) go to SDPA, whose flash
# back end is the grouped-query flash path on GPU; DIFF V1 / Shared DIFF use the fused kernel.
KERNELS: dict[str, AttentionKernel] = {
    "eager": FunctionKernel("eager", eager_attention, returns_maps=True),
    "sdpa": FunctionKernel("sdpa", sdpa_attention, sdpa_differential),
    "triton": FunctionKernel("triton", sdpa_attention, lambda *a, **kw: triton_differential(*a, **kw)),
}


def get_kernel(kernel) -> AttentionKernel:
    """The kernel named ``kernel`` (an :class:`AttentionKernel` is returned as it is)."""
    if isinstance(kernel, AttentionKernel):
        return kernel
    try:
        return KERNELS[kernel]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}") from None

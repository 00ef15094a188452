"""Small building blocks shared by every variant: RMSNorm, interleaved rotary embeddings, SwiGLU.

Shape letters used in this package: B batch, T new (query) positions, S key positions
(past + new), H heads of the variant, Hq query heads given to a kernel, Hkv key/value heads,
d query/key head width, dv value head width, D d_model, F ffn_hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64: where softmax, norms and λ are computed."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x · rsqrt(mean(x²) + eps) · g over the last dim, computed in fp32 (or fp64)."""
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain initialised to one."""

    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rotary:
    """Interleaved (GPT-J style) rotary tables for a batch of positions.

    Pairs of channels (0,1), (2,3), … are rotated, as in the DIFF reference code (methods.md §1.5).
    Tables are computed on the fly in fp32 (fp64 for fp64 models) from integer positions, so they
    never lose precision when the model is cast to bf16 and cost O(B·T·d/2) per forward.
    """

    def __init__(self, positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
        # positions: (B, T) int64
        cdt = compute_dtype(dtype)
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
        angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, T, d/2), exact in fp64
        self.cos = angles.cos().to(cdt)[:, :, None, :]  # (B, T, 1, d/2) broadcast over heads
        self.sin = angles.sin().to(cdt)[:, :, None, :]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (B, T, n_heads, d)."""
        xf = x.to(self.cos.dtype).unflatten(-1, (-1, 2))  # (B, T, n, d/2, 2)
        x_even, x_odd = xf[..., 0], xf[..., 1]
        out = torch.stack((x_even * self.cos - x_odd * self.sin, x_even * self.sin + x_odd * self.cos), dim=-1)
        return out.flatten(-2).to(x.dtype)


class SwiGLU(nn.Module):
    """SwiGLU(X) = (swish(X W^G) ⊙ X W_1) W_2, no biases (methods.md §1.7)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

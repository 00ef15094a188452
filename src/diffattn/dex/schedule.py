"""The DEX λ schedule (Kong et al., arXiv 2505.16333, "Eq. 4" as quoted by a third-party implementation).

    α(t)   = min(1, t/T)
    λ_l(t) = (1 − α)·(t/T)·λ_init,l + α·λ_learn,l
    λ_init,l = 0.8 − 0.6·exp(−0.3·depth)          (the DIFF V1 depth schedule, depth 0-based)

λ_learn,l is a learnable scalar per layer initialised near zero. At t = 0 λ is exactly 0 (the adapted
model is the base model); the λ_init term rises and fades (largest, λ_init/4, at t = T/2), and for
t ≥ T λ = λ_learn. The form is UNCONFIRMED against the paper (methods.md §4.3): it is implemented as
quoted and documented as such. ``lambda_init`` may also be a constant (DIFF V1's ablation used 0.8/0.5).
"""

from __future__ import annotations

import math

import torch


def lambda_init_for_depth(depth: int, mode: str | float = "depth") -> float:
    """λ_init for a 0-based layer index: ``"depth"`` → 0.8 − 0.6·exp(−0.3·depth), or a constant."""
    if isinstance(mode, str):
        if mode != "depth":
            try:
                return float(mode)
            except ValueError:
                raise ValueError(f"lambda_init must be 'depth' or a number, got {mode!r}") from None
        return 0.8 - 0.6 * math.exp(-0.3 * depth)
    return float(mode)


def schedule_alpha(t: float, T: float) -> float:
    """α = min(1, t/T); T ≤ 0 means "no annealing" (α = 1 from the start)."""
    if T <= 0:
        return 1.0
    return min(1.0, max(0.0, float(t)) / float(T))


def dex_lambda(t: float, T: float, lambda_init: float, lambda_learn: torch.Tensor | float) -> torch.Tensor | float:
    """λ(t) = (1 − α)·(t/T)·λ_init + α·λ_learn with α = min(1, t/T).

    ``lambda_learn`` may be a tensor (gradients flow through the α·λ_learn term) or a float.
    """
    a = schedule_alpha(t, T)
    ramp = (float(t) / float(T)) if T > 0 else 1.0
    return (1.0 - a) * ramp * lambda_init + a * lambda_learn

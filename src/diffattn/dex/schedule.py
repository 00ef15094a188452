"""The DEX λ schedules (Kong et al., arXiv 2505.16333; the paper's code is not public).

Two forms, with α(t) = min(1, t/T) and λ_init,l = 0.8 − 0.6·exp(−0.3·depth) (DIFF V1's depth schedule):

* ``"additive"`` (the default, chosen by measurement: docs/dex.md):  λ_l(t) = α·λ_init,l + λ_learn,l.
  λ_init is annealed in over T steps and the learnable part rides on top of it, as DIFF V1's
  λ = λ_init + (learnable part). It never collapses: for t ≥ T, λ = λ_init + λ_learn, so what W_D learned
  under λ ≈ λ_init keeps its weight.
* ``"quoted"``:  λ_l(t) = (1 − α)·(t/T)·λ_init,l + α·λ_learn,l — "Eq. 4" as quoted by a third-party
  implementation (which mis-cites the paper). The λ_init term rises and fades (largest, λ_init/4, at
  t = T/2), and for t ≥ T, λ = λ_learn alone: a λ_learn started near zero must be carried to its target by
  the optimizer (see :func:`lambda_reach`), or the adapter's effect collapses at t = T.

Under both, λ(0) = λ_learn(0) (0 by default): the adapted model starts as the base model.
``lambda_init`` may also be a constant (DIFF V1's ablation used 0.8/0.5). Both forms are UNCONFIRMED
against the paper (methods.md §4.3) and recorded in every adapter config.
"""

from __future__ import annotations


import torch

from ..config import lambda_init_for_depth as depth_schedule


def lambda_init_for_depth(depth: int, mode: str | float = "depth") -> float:
    """λ_init for a 0-based layer index: ``"depth"`` → DIFF V1's schedule (config.lambda_init_for_depth, the one
    definition), or a constant (a number, or its string form as the CLI passes it)."""
    if isinstance(mode, str):
        if mode == "depth":
            return depth_schedule(depth)
        try:
            return float(mode)
        except ValueError:
            raise ValueError(f"lambda_init must be 'depth' or a number, got {mode!r}") from None
    return float(mode)


def schedule_alpha(t: float, T: float) -> float:
    """α = min(1, t/T); T ≤ 0 means "no annealing" (α = 1 from the start)."""
    if T <= 0:
        return 1.0
    return min(1.0, max(0.0, float(t)) / float(T))


SCHEDULES = ("additive", "quoted")


def dex_lambda(t: float, T: float, lambda_init: float, lambda_learn: torch.Tensor | float,
               schedule: str = "quoted") -> torch.Tensor | float:
    """λ(t) of ``schedule`` (module docstring); ``lambda_learn`` may be a tensor (gradients flow through it)."""
    a = schedule_alpha(t, T)
    if schedule == "additive":
        return a * lambda_init + lambda_learn
    if schedule != "quoted":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    ramp = (float(t) / float(T)) if T > 0 else 1.0
    return (1.0 - a) * ramp * lambda_init + a * lambda_learn


def lambda_reach(lrs, start: float = 0.0) -> float:
    """How far Adam(W) can move a scalar in the steps with learning rates ``lrs``: about one learning rate per
    step at most (its update is lr·m̂/(√v̂+ε), |m̂/√v̂| ≲ 1), so |λ_learn − start| ≤ Σ lr. The quoted schedule
    ends at λ = λ_learn: a target above ``start + Σ lr`` cannot be reached."""
    return float(start) + float(sum(lrs))

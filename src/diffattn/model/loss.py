"""The language-modelling loss, written once: next-token cross-entropy computed in fp32.

Every trainer (the main loop, DEX, the recall study, the benchmarks' and the compare cost step) uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), in fp32; targets of -100 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """:func:`lm_loss` of the logits of ``ids`` (B, T, V) predicting ``ids`` shifted by one."""
    return lm_loss(logits[:, :-1], ids[:, 1:], reduction)


__all__ = ["lm_loss", "next_token_loss"]

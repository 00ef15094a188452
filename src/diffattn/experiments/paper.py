"""The papers' headline numbers the comparison report sits its own results next to, and the verdicts.

Every number cites its place in ../shared/reference/methods.md. They were measured at 350B-1T
tokens and 3B parameters; a CPU-sized study cannot reproduce their *magnitude*, only the
*direction* of an effect, so verdicts compare signs and weigh them against the seed spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# (claim id) -> what the paper reports, the direction it implies, and the source
PAPER = {
    "val_loss": dict(
        text="DIFF 3.062 vs Transformer 3.087 valid loss (1.4B, Table 6); V2: 0.02-0.03 lower LM loss at 1T tokens (blog)",
        better="lower", source="methods.md §1.9 Table 6; §2.5"),
    "needle_4k_6_2": dict(
        text="multi-needle N=6, R=2 at 4K: DIFF 0.85 vs Transformer 0.55 (Table 2; transcription prints 0.35)",
        better="higher", source="methods.md §1.9 Table 2"),
    "needle": dict(
        text="multi-needle at 4K (N/R 1/1, 2/2, 4/2, 6/2): DIFF 1.00/0.92/0.84/0.85 vs Transformer 1.00/0.85/0.62/0.55",
        better="higher", source="methods.md §1.9 Table 2"),
    "attention_answer": dict(
        text="attention to the answer span: DIFF 0.27-0.40 vs Transformer 0.03-0.09 (Table 3)",
        better="higher", source="methods.md §1.9 Table 3"),
    "attention_noise": dict(
        text="attention noise (other context): DIFF 0.01-0.02 vs Transformer 0.49-0.54 (Table 3)",
        better="lower", source="methods.md §1.9 Table 3"),
    "outlier_logits": dict(
        text="top-1 |attention logit|: DIFF 38.8 vs Transformer 318.0 (Table 5)",
        better="lower", source="methods.md §1.9 Table 5"),
    "outlier_hidden": dict(
        text="top-1 |hidden state|: DIFF 1688.2 vs Transformer 3608.6 (Table 5)",
        better="lower", source="methods.md §1.9 Table 5"),
    "throughput": dict(
        text="V1 training throughput −9% (3B, 2K) to −12% (3B, 4K) vs Transformer, same FlashAttention (Table 7); V2: negligible",
        better="higher", source="methods.md §1.9 Table 7; §2.3"),
    "lambda": dict(
        text="learned λ ≈ 0.8 in most (deep) layers, 0.2-0.4 in the first few, never negative (author, issue #1699)",
        better=None, source="methods.md §1.3"),
}

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Verdict:
    verdict: str
    diff: float  # mean(variant) − mean(baseline)
    spread: float  # the noise scale the difference is judged against
    reason: str


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def verdict(variant: Sequence[float], baseline: Sequence[float], better: str, *, min_effect: float = 0.0) -> Verdict:
    """Direction-of-effect verdict of ``variant`` against ``baseline`` (one value per seed each).

    ``better`` is "higher" or "lower": the direction the paper claims for the DIFF variant.
    The difference of means counts only when it exceeds the seed spread (the larger of the two
    sample standard deviations, or ``min_effect`` when there is a single seed — a single seed can
    never show that a small difference is real, so such results are inconclusive unless they
    exceed ``min_effect``). Then it is "reproduced" when it points the paper's way and
    "not reproduced" when it points the other way; otherwise "inconclusive".
    """
    variant = [float(x) for x in variant if x is not None and math.isfinite(x)]
    baseline = [float(x) for x in baseline if x is not None and math.isfinite(x)]
    if not variant or not baseline:
        return Verdict(NOT_MEASURED, float("nan"), float("nan"), "no values")
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    diff = _mean(variant) - _mean(baseline)
    spread = max(_std(variant), _std(baseline), min_effect)
    n = min(len(variant), len(baseline))
    if abs(diff) <= spread:
        return Verdict(INCONCLUSIVE, diff, spread,
                       f"|difference| {abs(diff):.4g} within the spread {spread:.4g} ({n} seed{'s' * (n > 1)})")
    good = diff > 0 if better == "higher" else diff < 0
    return Verdict(REPRODUCED if good else NOT_REPRODUCED, diff, spread,
                   f"difference {diff:+.4g} beyond the spread {spread:.4g} ({n} seed{'s' * (n > 1)})")

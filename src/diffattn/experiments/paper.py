"""The papers' headline numbers the comparison report sits its own results next to, and the verdicts.

Every number cites its place in ../shared/reference/methods.md. They were measured at 350B-1T
tokens and 3B parameters; a CPU-sized study cannot reproduce their *magnitude*, only the
*direction* of an effect, so verdicts compare signs and weigh them against the seed spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..utils import stats

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
        ratio="0.88-0.91×", better="higher", source="methods.md §1.9 Table 7; §2.3"),
    "lambda": dict(
        text="learned λ ≈ 0.8 in most (deep) layers, 0.2-0.4 in the first few, never negative (author, issue #1699)",
        better=None, source="methods.md §1.3"),
}

# The paper's tables the report prints next to its own, as printed (strings keep the paper's digits).
PAPER_TABLES = {
    # multi-needle accuracy at 4K, N/R -> (Transformer, DIFF), 3B models (methods.md §1.9 Table 2)
    "needle": {"1/1": ("1.00", "1.00"), "2/2": ("0.85", "0.92"), "4/2": ("0.62", "0.84"), "6/2": ("0.55", "0.85")},
    # attention allocation by depth (0, 25, 50, 75, 100 %): rows (model, what, shares...) (methods.md §1.9 Table 3)
    "attention_noise": (
        ("paper, Transformer", "answer", "0.03", "0.03", "0.03", "0.07", "0.09"),
        ("paper, DIFF", "answer", "0.27", "0.30", "0.31", "0.32", "0.40"),
        ("paper, Transformer", "noise", "0.51", "0.54", "0.52", "0.49", "0.49"),
        ("paper, DIFF", "noise", "0.01", "0.02", "0.02", "0.02", "0.01")),
    # largest activations: top-1, 2, 3, 10, 100 and the median (methods.md §1.9 Table 5)
    "outliers": (
        ("attention logits", "paper, Transformer", "318.0", "308.2", "304.9", "284.7", "251.5", "5.4"),
        ("attention logits", "paper, DIFF", "38.8", "38.8", "37.3", "32.0", "27.4", "3.3"),
        ("hidden states", "paper, Transformer", "3608.6", "3607.4", "3603.6", "3552.1", "2448.2", "0.6"),
        ("hidden states", "paper, DIFF", "1688.2", "1672.5", "1672.1", "1624.3", "740.9", "1.2")),
}

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_MEASURED = "not measured"


VERDICT_RULE = (
    "Verdicts are seed-paired: for every seed the difference d = variant − baseline is taken (same seed, same "
    "data order). With two or more seeds a claim is **reproduced** when every d points the paper's way and the "
    "mean of d exceeds twice its standard error (SE = sample std of d / √n), **not reproduced** when every d "
    "points the other way by the same test, and **inconclusive** otherwise. With a single seed there is no "
    "spread to judge against: the one difference must exceed a fixed margin stated per metric, and such a "
    "verdict is weaker than a seed-paired one.")


@dataclass(frozen=True)
class Verdict:
    verdict: str
    diff: float  # mean over paired seeds of (variant − baseline)
    spread: float  # what |diff| was judged against: 2·SE with ≥ 2 seeds, the fixed margin with one
    reason: str
    n: int = 0  # paired seeds


def _mean(xs: Sequence[float]) -> float:
    return stats.mean(xs)


def _std(xs: Sequence[float]) -> float:
    return stats.sample_std(xs) or 0.0


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def paired_differences(variant, baseline) -> list[float]:
    """variant − baseline per seed. Both are sequences in the same seed order (``None`` where a seed
    is missing) or mappings seed → value; only seeds with a finite value on both sides pair up."""
    if isinstance(variant, Mapping) or isinstance(baseline, Mapping):
        if not (isinstance(variant, Mapping) and isinstance(baseline, Mapping)):
            raise TypeError("variant and baseline must both be mappings (seed -> value) or both sequences")
        keys = [k for k in variant if k in baseline]
        pairs = [(variant[k], baseline[k]) for k in keys]
    else:
        if len(variant) != len(baseline):
            raise ValueError(f"seed-paired values need one value per seed on both sides, got {len(variant)} "
                             f"and {len(baseline)} (use None for a missing seed)")
        pairs = list(zip(variant, baseline))
    return [float(a) - float(b) for a, b in pairs if _finite(a) and _finite(b)]


def verdict(variant, baseline, better: str, *, min_effect: float = 0.0) -> Verdict:
    """The seed-paired verdict of ``variant`` against ``baseline`` (VERDICT_RULE; one value per seed each).

    ``better`` is "higher" or "lower": the direction the paper claims for the DIFF variant.
    ``min_effect`` is the fixed margin a single seed's difference must exceed.
    """
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    d = paired_differences(variant, baseline)
    if not d:
        return Verdict(NOT_MEASURED, float("nan"), float("nan"), "no paired values")
    sign = 1.0 if better == "higher" else -1.0
    n, mean = len(d), _mean(d)
    if n == 1:
        if abs(mean) <= min_effect:
            return Verdict(INCONCLUSIVE, mean, min_effect, f"one seed: |d| {abs(mean):.4g} within the margin "
                           f"{min_effect:.4g}", 1)
        good = sign * mean > 0
        return Verdict(REPRODUCED if good else NOT_REPRODUCED, mean, min_effect,
                       f"one seed: d {mean:+.4g} beyond the margin {min_effect:.4g}", 1)
    se = _std(d) / math.sqrt(n)
    for outcome, s in ((REPRODUCED, sign), (NOT_REPRODUCED, -sign)):
        if all(s * x > 0 for x in d) and abs(mean) > 2 * se:
            return Verdict(outcome, mean, 2 * se, f"{n} seeds, every d {'+' if s > 0 else '-'}, mean "
                           f"{mean:+.4g} beyond 2·SE {2 * se:.4g}", n)
    agree = sum(sign * x > 0 for x in d)
    return Verdict(INCONCLUSIVE, mean, 2 * se, f"{n} seeds, {agree} of {n} the paper's way, mean {mean:+.4g}, "
                   f"2·SE {2 * se:.4g}", n)

"""The summary statistics every report and task uses (one definition each, documented ddof).

* :func:`mean` — arithmetic mean of the values that are not None (and, with ``drop_nan``, not NaN).
* :func:`sample_std` — the seed spread: sample standard deviation (ddof = 1), None below two values.
  Verdicts and "mean ± std" over seeds use it.
* :func:`population_std` — the spread of one run's per-sample scores (ddof = 0), as the eval tasks report it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional


def _values(xs: Iterable, drop_nan: bool) -> list[float]:
    return [x for x in xs if x is not None and not (drop_nan and isinstance(x, float) and math.isnan(x))]


def mean(xs: Iterable, *, drop_nan: bool = False) -> Optional[float]:
    vals = _values(xs, drop_nan)
    return float(sum(vals) / len(vals)) if vals else None


def sample_std(xs: Iterable, *, drop_nan: bool = False) -> Optional[float]:
    vals = _values(xs, drop_nan)
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1))


def population_std(xs: Iterable) -> Optional[float]:
    vals = _values(xs, False)
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return float(math.sqrt(sum((x - m) ** 2 for x in vals) / len(vals)))


# ------------------------------------------------------------------ the seed-paired verdict rule
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


def sampling_margin(n: int | None) -> float:
    """2·√(2·0.25/n): twice the worst-case standard error of a difference of two proportions on n items each
    (infinite without items)."""
    return 2 * math.sqrt(0.5 / n) if n else float("inf")


def verdict(variant, baseline, better: str, *, min_effect: float = 0.0, noise: float | None = None) -> Verdict:
    """The seed-paired verdict of ``variant`` against ``baseline`` (VERDICT_RULE; one value per seed each).

    ``better`` is "higher" or "lower": the direction the paper claims for the DIFF variant.
    ``min_effect`` is the fixed margin a single seed's difference must exceed. ``noise`` is the evaluation's own
    sampling margin (``sampling_margin(n)``), which seeds scored on the same items cannot measure: a difference
    within it is inconclusive however many seeds agree.
    """
    v = _seed_verdict(variant, baseline, better, max(min_effect, noise or 0.0))
    if noise is not None and v.verdict in (REPRODUCED, NOT_REPRODUCED) and abs(v.diff) <= noise:
        return Verdict(INCONCLUSIVE, v.diff, v.spread, f"{v.reason}, but |d| within the sampling margin "
                       f"{noise:.3g}", v.n)
    return v


def _seed_verdict(variant, baseline, better: str, min_effect: float) -> Verdict:
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    d = paired_differences(variant, baseline)
    if not d:
        return Verdict(NOT_MEASURED, float("nan"), float("nan"), "no paired values")
    sign = 1.0 if better == "higher" else -1.0
    n, m = len(d), mean(d)
    if n == 1:
        if abs(m) <= min_effect:
            return Verdict(INCONCLUSIVE, m, min_effect, f"one seed: |d| {abs(m):.4g} within the margin "
                           f"{min_effect:.4g}", 1)
        good = sign * m > 0
        return Verdict(REPRODUCED if good else NOT_REPRODUCED, m, min_effect,
                       f"one seed: d {m:+.4g} beyond the margin {min_effect:.4g}", 1)
    se = (sample_std(d) or 0.0) / math.sqrt(n)
    for outcome, s in ((REPRODUCED, sign), (NOT_REPRODUCED, -sign)):
        if all(s * x > 0 for x in d) and abs(m) > 2 * se:
            return Verdict(outcome, m, 2 * se, f"{n} seeds, every d {'+' if s > 0 else '-'}, mean "
                           f"{m:+.4g} beyond 2·SE {2 * se:.4g}", n)
    agree = sum(sign * x > 0 for x in d)
    return Verdict(INCONCLUSIVE, m, 2 * se, f"{n} seeds, {agree} of {n} the paper's way, mean {m:+.4g}, "
                   f"2·SE {2 * se:.4g}", n)


__all__ = ["mean", "sample_std", "population_std", "verdict", "sampling_margin", "paired_differences", "Verdict", "VERDICT_RULE",
           "REPRODUCED", "NOT_REPRODUCED", "INCONCLUSIVE", "NOT_MEASURED"]

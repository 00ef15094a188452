"""The summary statistics every report and task uses (one definition each, documented ddof).

* :func:`mean` — arithmetic mean of the values that are not None (and, with ``drop_nan``, not NaN).
* :func:`sample_std` — the seed spread: sample standard deviation (ddof = 1), None below two values.
  Verdicts and "mean ± std" over seeds use it.
* :func:`population_std` — the spread of one run's per-sample scores (ddof = 0), as the eval tasks report it.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional


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


__all__ = ["mean", "sample_std", "population_std"]

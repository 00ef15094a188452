"""Value checks with one-line errors naming the owner and the field (``ModelConfig.head_dim: must be ...``).

Shared by ``config.py`` (the generic fields) and ``variants.py`` (each variant's own fields, which the
variant's registry row checks)."""

from __future__ import annotations

import math
from typing import Any

MAX_SIZE = 1 << 24  # guards against absurd sizes (typos like 10**12) before any allocation


def fail(name: str, msg: str, owner: str = "ModelConfig") -> None:
    raise ValueError(f"{owner}.{name}: {msg}")


def check_int(name: str, value: Any, lo: int, hi: int = MAX_SIZE, owner: str = "ModelConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, f"must be an integer in [{lo}, {hi}], got {value!r}", owner)
    if not lo <= value <= hi:
        fail(name, f"must be in [{lo}, {hi}], got {value}", owner)


def check_float(name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False,
                owner: str = "ModelConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(name, f"must be a finite number, got {value!r}", owner)
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if bad_lo or bad_hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        fail(name, f"must be in {rng}, got {value}", owner)


def check_bool(name: str, value: Any, owner: str = "ModelConfig") -> None:
    if not isinstance(value, bool):
        fail(name, f"must be true or false, got {value!r}", owner)


def check_choice(name: str, value: Any, valid, owner: str = "ModelConfig") -> None:
    if value not in valid:
        fail(name, f"unknown {value!r}; valid: {', '.join(valid)}", owner)


__all__ = ["MAX_SIZE", "fail", "check_int", "check_float", "check_bool", "check_choice"]

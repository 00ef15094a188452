"""Timing helpers shared by the benchmarks and the comparison study: device sync and round-robin timing."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        ts = sorted(self.times)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        return dict(median_s=statistics.median(ts), min_s=ts[0], max_s=ts[-1], q1_s=q[0], q3_s=q[2],
                    repeats=len(ts), times_s=[round(t, 6) for t in self.times])


def round_robin(rows: dict[str, Callable[[], None]], *, warmup: int, repeats: int, device: str,
                progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Time each callable: ``warmup`` untimed calls each, then ``repeats`` rounds over all rows."""
    if progress:
        progress(f"warm-up ({warmup} per row, {len(rows)} rows)")
    for name, fn in rows.items():
        for _ in range(warmup):
            fn()
        sync(device)
    timings = {name: Timing() for name in rows}
    for r in range(repeats):
        if progress:
            progress(f"repeat {r + 1}/{repeats}")
        for name, fn in rows.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            timings[name].times.append(time.perf_counter() - t0)
    return {name: t.summary() for name, t in timings.items()}


__all__ = ["sync", "Timing", "round_robin"]

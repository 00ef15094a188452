"""The learning-rate schedule: one pure function of the 0-based optimizer step, used by the trainer
(``TrainConfig.lr_at``), the recall study (experiments/recall.py) and DEX (dex/train.py).

Linear warm-up to the peak ``lr`` over ``warmup_steps`` (step s uses lr·(s+1)/warmup), then a decay from ``lr``
to a floor at ``total_steps``, held at the floor beyond it: ``cosine`` (the default), ``linear`` or ``constant``
(no decay). Being a pure function of the step, exact resume needs no scheduler object.

The floor is given in one of two ways, which differ in the last bit of some steps and so are kept apart:

* ``min_lr`` (the trainer, DEX): ``min_lr + (lr − min_lr)·½(1 + cos πp)``;
* ``min_ratio`` (the recall study): ``lr·(r + (1 − r)·½(1 + cos πp))``, the floor being r·lr.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          min_lr: float = 0.0, min_ratio: float | None = None) -> float:
    """Learning rate of 0-based optimizer step ``step`` (see the module docstring); ``min_ratio`` (cosine only)
    replaces ``min_lr``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if min_ratio is not None and (schedule != "cosine" or min_lr != 0.0):
        raise ValueError("min_ratio is a cosine schedule's floor and replaces min_lr")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    cosine = 1.0 + math.cos(math.pi * progress)
    if min_ratio is not None:
        return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * cosine)
    return min_lr + (lr - min_lr) * 0.5 * cosine


__all__ = ["SCHEDULES", "lr_at"]

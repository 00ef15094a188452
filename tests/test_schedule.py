"""The one learning-rate schedule (train/schedule.py) gives, bit for bit, the learning rates of the four schedules it
replaced (issue #27): the trainer's warm-up + cosine (train/optim.py ``warmup_cosine_lr``), ``TrainConfig.lr_at``
(cosine / linear / constant), the recall study's ``_lr_at`` and DEX's ``lr_at``. Their code is copied below, as it
was at b7a6663, as the reference.

Why ``==`` and not approx: each reference and the new function are Python floats (IEEE-754 doubles) computed by
the same operations on the same operands in the same order, and CPython's +, −, ×, / on floats are correctly
rounded on every platform; the one libm call, ``math.cos``, gets the same argument (``math.pi * progress``, the
same product) in both, so it returns the same double within one process. Equal inputs through equal operations
give equal bits, so any difference would be a real change of the schedule (which would change training runs).
"""

import math
import random
from types import SimpleNamespace

import pytest

from diffattn.dex.train import TrainSettings
from diffattn.dex.train import lr_at as dex_lr_at
from diffattn.experiments.recall import _lr_at as recall_lr_at
from diffattn.train import TrainConfig
from diffattn.train.schedule import lr_at


# ------------------------------------------------------------------ the old code, verbatim (the reference)
def old_warmup_cosine_lr(step, *, lr, warmup_steps, total_steps, min_lr):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def old_train_config_lr_at(self, step, total_steps):
    if step < self.warmup_steps or self.schedule == "cosine":
        return old_warmup_cosine_lr(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=total_steps,
                                    min_lr=self.min_lr)
    if self.schedule == "constant":
        return self.lr
    progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
    return self.lr - (self.lr - self.min_lr) * progress  # linear


def old_recall_lr_at(step, opts):
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def old_dex_lr_at(step, s):
    return old_warmup_cosine_lr(step, lr=s.lr, warmup_steps=s.warmup_steps, total_steps=s.steps, min_lr=0.1 * s.lr)


# ------------------------------------------------------------------ settings
_RNG = random.Random(27)
# the defaults and recipes in use (trainer, recall 3e-3, DEX 1e-3, the DIFF recipes) and random peaks
PEAKS = [1.0, 0.1, 3e-3, 1e-3, 3e-4, 3.2e-4, 1.5e-3, 7.5e-4, 6e-4] + [10 ** _RNG.uniform(-5, 0) for _ in range(6)]
WARMUPS = [0, 1, 3, 10, 50, 375]
TOTALS = [1, 2, 20, 110, 500, 1000]


def _settings():
    for lr in PEAKS:
        for warmup in WARMUPS:
            for total in TOTALS:
                yield lr, warmup, total


def _steps(total):
    return range(total + 12)  # past the horizon too: the floor is held


def test_trainer_schedules_are_bit_identical_to_the_old_code():
    n = 0
    for lr, warmup, total in _settings():
        for min_lr in (0.0, 1.28e-5, 0.1 * lr, lr / 3):
            for schedule in ("cosine", "linear", "constant"):
                cfg = TrainConfig(data="d", out="o", max_steps=total, lr=lr, min_lr=min_lr, warmup_steps=warmup,
                                  schedule=schedule)
                for step in _steps(total):
                    want = old_train_config_lr_at(cfg, step, total)
                    assert cfg.lr_at(step, total) == want, (lr, warmup, total, min_lr, schedule, step)
                    assert lr_at(step, lr=lr, warmup_steps=warmup, total_steps=total, schedule=schedule,
                                 min_lr=min_lr) == want
                    if schedule == "cosine":
                        assert want == old_warmup_cosine_lr(step, lr=lr, warmup_steps=warmup, total_steps=total,
                                                            min_lr=min_lr)
                    n += 1
    assert n > 100_000


def test_recall_and_dex_schedules_are_bit_identical_to_the_old_code():
    for lr, warmup, total in _settings():
        opts = SimpleNamespace(lr=lr, warmup_steps=warmup, steps=total)
        dex = TrainSettings(steps=total, lr=lr, warmup_steps=warmup)
        for step in _steps(total):
            assert recall_lr_at(step, opts) == old_recall_lr_at(step, opts), (lr, warmup, total, step)
            assert dex_lr_at(step, dex) == old_dex_lr_at(step, dex), (lr, warmup, total, step)


def test_the_two_floors_are_kept_apart_because_they_differ_in_the_last_bit():
    # lr·(0.1 + 0.9·½(1+cos)) (recall) and 0.1·lr + 0.9·lr·½(1+cos) (DEX) are the same real number, not always the
    # same double: one shared formula would have changed one of them. 1.0 - 0.1 == 0.9 exactly, which is what lets
    # the ratio form write the recall study's 0.9 as (1 - r).
    assert 1.0 - 0.1 == 0.9
    differ = 0
    for lr, warmup, total in _settings():
        for step in _steps(total):
            ratio = lr_at(step, lr=lr, warmup_steps=warmup, total_steps=total, min_ratio=0.1)
            absolute = lr_at(step, lr=lr, warmup_steps=warmup, total_steps=total, min_lr=0.1 * lr)
            assert ratio == pytest.approx(absolute, rel=1e-15, abs=0)
            differ += ratio != absolute
    assert differ > 0


def test_the_schedule_shape_and_its_checks():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110)
    assert [lr_at(s, **kw) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # step s uses lr·(s+1)/warmup
    assert lr_at(10, **kw) == 1.0 and lr_at(110, **kw) == 0.0 == lr_at(500, **kw)
    assert lr_at(60, **kw, min_lr=0.1) == pytest.approx(0.55)
    assert lr_at(110, **kw, min_ratio=0.25) == pytest.approx(0.25)
    assert lr_at(35, **kw, schedule="linear", min_lr=0.1) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr_at(100, **kw, schedule="constant", min_lr=0.1) == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_at(0, **kw, schedule="step")
    with pytest.raises(ValueError, match="min_ratio"):
        lr_at(0, **kw, schedule="linear", min_ratio=0.1)
    with pytest.raises(ValueError, match="min_ratio"):
        lr_at(0, **kw, min_lr=0.1, min_ratio=0.1)

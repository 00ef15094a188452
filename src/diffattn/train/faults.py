"""Fault handling in training: non-finite steps, λ / gradient-norm explosions, and test hooks.

* :class:`NumericsGuard` — decides, per optimizer step, whether the step is finite (loss and
  global gradient norm); a non-finite step is *skipped* (no parameter or optimizer-state update),
  counted and logged, and once more than ``TrainConfig.max_skipped_steps`` steps were skipped the
  run stops with :class:`NumericalFault` (exit code 3), keeping its last good checkpoint. It also
  watches the λ of every DIFF V1 / Shared DIFF layer (|λ| > ``TrainConfig.lambda_alarm``) and the
  gradient norm (> ``TrainConfig.grad_spike_factor`` × the running median of the last
  ``SPIKE_WINDOW`` finite norms): an explosion is written to metrics.jsonl as an ``"alarm"``
  record and raised as a Python warning — reported, never hidden, never acted on silently.
* Test hooks, read from the environment so that a test can drive a ``diffattn train``
  subprocess (docs/reliability.md):

  - ``DIFFATTN_TEST_PAUSE_IN_CHECKPOINT_WRITE=SECONDS[@POINT[>=STEP]]`` (``1`` = 1 s at every
    point): at a point inside a checkpoint write (:func:`checkpoint_write_point`: model-written,
    optimizer-written, state-written, before-rename, renamed, pruning), optionally only that point
    and only for checkpoints of step >= STEP, print ``diffattn-test: checkpoint-write <point>
    <step>`` on stderr and sleep, so a test can SIGKILL the process mid-write.
  - ``DIFFATTN_TEST_NAN_STEPS=3,5``: multiply the loss of those optimizer steps by NaN.

The guard's state (skipped-step count) is saved in train_state.json, so the limit spans resumes,
and skipping is a deterministic function of the state, so exact resume still holds.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import warnings
from collections import deque

from ..utils.errors import RunError

PAUSE_ENV = "DIFFATTN_TEST_PAUSE_IN_CHECKPOINT_WRITE"
NAN_ENV = "DIFFATTN_TEST_NAN_STEPS"
SPIKE_WINDOW = 100  # finite gradient norms in the running median
SPIKE_MIN_HISTORY = 10  # no spike alarm before this many finite steps


class NumericalFault(RunError):
    """Too many non-finite steps: the run stops (exit code 3); its last checkpoint is kept."""

    exit_code = 3


class TrainingAlarm(UserWarning):
    """λ or the gradient norm exploded (reported; training continues)."""


# ---------------------------------------------------------------------- test hooks
def checkpoint_write_point(point: str, step: int) -> None:
    """Test hook inside :func:`diffattn.train.checkpoint.save_checkpoint` (no-op unless the env var is set)."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    seconds, _, where = value.partition("@")
    if where:
        name, _, min_step = where.partition(">=")
        if name != point or (min_step and step < int(min_step)):
            return
    print(f"diffattn-test: checkpoint-write {point} {step}", file=sys.stderr, flush=True)
    time.sleep(float(seconds))


_nan_cache: tuple[str | None, frozenset[int]] = (None, frozenset())


def nan_injected(step: int) -> bool:
    """True when ``DIFFATTN_TEST_NAN_STEPS`` lists ``step`` (a test hook)."""
    global _nan_cache
    value = os.environ.get(NAN_ENV)
    if not value:
        return False
    if _nan_cache[0] != value:
        _nan_cache = (value, frozenset(int(s) for s in value.split(",") if s.strip()))
    return step in _nan_cache[1]


# ---------------------------------------------------------------------- the guard
class NumericsGuard:
    """Skip / count non-finite steps and report λ and gradient-norm explosions (module docstring)."""

    def __init__(self, max_skipped_steps: int, lambda_alarm: float, grad_spike_factor: float, skipped: int = 0):
        self.max_skipped_steps = max_skipped_steps
        self.lambda_alarm = lambda_alarm
        self.grad_spike_factor = grad_spike_factor
        self.skipped = skipped
        self.norms: deque[float] = deque(maxlen=SPIKE_WINDOW)

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def skip(self, step: int, loss: float, grad_norm: float) -> dict:
        """Count a skipped step; the metrics record to log. Raises NumericalFault past the limit."""
        self.skipped += 1
        record = {"kind": "skip", "step": step, "loss": _json_float(loss), "grad_norm": _json_float(grad_norm),
                  "skipped_steps": self.skipped, "max_skipped_steps": self.max_skipped_steps}
        warnings.warn(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}; step skipped "
                      f"({self.skipped} of at most {self.max_skipped_steps})", TrainingAlarm, stacklevel=2)
        return record

    def over_limit(self) -> bool:
        return self.skipped > self.max_skipped_steps

    def fault(self, step: int, last_checkpoint) -> NumericalFault:
        kept = f"; last good checkpoint {last_checkpoint}" if last_checkpoint else "; no checkpoint was written"
        return NumericalFault(f"stopped at step {step}: {self.skipped} non-finite steps skipped, more than "
                              f"max_skipped_steps={self.max_skipped_steps}{kept}")

    def watch_grad(self, step: int, grad_norm: float) -> list[dict]:
        """An alarm record (also warned) when this finite step's gradient norm is a spike."""
        alarms = []
        if self.grad_spike_factor > 0 and len(self.norms) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.norms)
            if median > 0 and grad_norm > self.grad_spike_factor * median:
                alarms.append({"kind": "alarm", "step": step, "what": "grad_norm", "grad_norm": grad_norm,
                               "running_median": median, "factor": self.grad_spike_factor})
                warnings.warn(f"step {step}: grad norm {grad_norm:.4g} > {self.grad_spike_factor:g} x running "
                              f"median {median:.4g}", TrainingAlarm, stacklevel=2)
        self.norms.append(grad_norm)
        return alarms

    def watch_lambda(self, step: int, lambdas: list[float]) -> list[dict]:
        """Alarm records (also warned) for every DIFF layer whose λ is non-finite or |λ| > lambda_alarm."""
        alarms = []
        if self.lambda_alarm > 0:
            for layer, lam in enumerate(lambdas or []):
                if not math.isfinite(lam) or abs(lam) > self.lambda_alarm:
                    alarms.append({"kind": "alarm", "step": step, "what": "lambda", "layer": layer,
                                   "lambda": _json_float(lam), "threshold": self.lambda_alarm})
                    warnings.warn(f"step {step}: layer {layer} lambda {lam} exceeds |{self.lambda_alarm:g}|",
                                  TrainingAlarm, stacklevel=2)
        return alarms


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # strict JSON has no NaN / Infinity


__all__ = ["NumericsGuard", "NumericalFault", "TrainingAlarm", "checkpoint_write_point", "nan_injected",
           "PAUSE_ENV", "NAN_ENV"]

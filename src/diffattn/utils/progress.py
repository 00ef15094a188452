"""Progress for terminals and for log files: a tqdm bar on a terminal, plain lines when stderr is redirected.

A run started as ``diffattn train ... > log 2>&1`` (or under a scheduler) has no terminal: a bar would be
silent there (tqdm's ``disable=None``), so :class:`StepProgress` prints one line per ``report`` instead::

    train diff_v1: step 50/400 loss 4.1234 12,345 tok/s λ 0.812 [0.790, 0.840] eta 5m12s

and :func:`phase` prints one line per phase of a command (loading, head selection, evaluation) with its
duration, on a terminal too (above the bar), since the split of a command's time is worth seeing there as well.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Sequence


def stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def duration(seconds: float) -> str:
    """``42.3 s``, ``5m12s``, ``2h05m``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def lambda_summary(values: Sequence[float] | None) -> str | None:
    """``λ 0.812`` for one layer, ``λ 0.812 [0.790, 0.840]`` (mean [min, max]) for several, None for none."""
    values = [float(v) for v in values or []]
    if not values:
        return None
    mean = sum(values) / len(values)
    return f"λ {mean:.3f}" if len(values) == 1 else f"λ {mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


class StepProgress:
    """Progress of a loop of ``total`` steps: a tqdm bar on a terminal, one line per :meth:`report` elsewhere.

    ``enabled=False`` makes every call a no-op. ``initial``: the step a resumed loop starts from (the ETA
    counts only the steps of this process). Lines go to ``write`` (default: stderr)."""

    def __init__(self, label: str, total: int, *, initial: int = 0, enabled: bool = True, unit: str = "step",
                 write: Callable[[str], None] | None = None, terminal: bool | None = None):
        self.label, self.total, self.initial = label, total, initial
        self.enabled = enabled
        self.terminal = on_terminal() if terminal is None else terminal
        self._write = write or stderr_line
        self.bar = None
        self.t0 = time.perf_counter()
        if enabled and self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=label)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, step: int, *, loss: float | None = None, tokens_per_s: float | None = None,
               lambdas: Sequence[float] | None = None, **extra: str) -> None:
        """The state at ``step``: the bar's postfix on a terminal, a plain line (with an ETA) elsewhere."""
        if not self.enabled:
            return
        lam = lambda_summary(lambdas)
        if self.bar is not None:
            post = {}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            if tokens_per_s is not None:
                post["tok_s"] = f"{tokens_per_s:,.0f}"
            if lam is not None:
                post["lam"] = lam.split()[1]
            self.bar.set_postfix(**post, **extra, refresh=False)
            return
        parts = [f"{self.label}: step {step}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        if lam is not None:
            parts.append(lam)
        parts += [f"{k} {v}" for k, v in extra.items()]
        done = step - self.initial
        if 0 < done and step < self.total:
            parts.append(f"eta {duration((time.perf_counter() - self.t0) / done * (self.total - step))}")
        self._write(" ".join(parts))

    def line(self, msg: str) -> None:
        """A line above the bar on a terminal, a plain line elsewhere (even when not ``enabled``)."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self._write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def phase(name: str, log: Callable[[str], None] | None = None, times: dict | None = None) -> Iterator[dict]:
    """Time a phase of a command and print ``{name}: 12.3 s`` when it ends; ``times[name]`` gets the seconds.
    The yielded dict's ``"detail"`` is added to the line. A phase that raises prints nothing (the error is the
    command's one line)."""
    log = log or stderr_line
    info: dict = {}
    t0 = time.perf_counter()
    yield info
    seconds = time.perf_counter() - t0
    if times is not None:
        times[name] = round(seconds, 2)
    detail = f" ({info['detail']})" if info.get("detail") else ""
    log(f"{name}: {duration(seconds)}{detail}")


__all__ = ["StepProgress", "duration", "lambda_summary", "on_terminal", "phase", "stderr_line"]

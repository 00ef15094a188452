"""Shared machinery of the evaluation tasks: typed options, seeding, results/tables/plots, atomic output.

Every task has a frozen ``<Task>Options`` dataclass (a subclass of :class:`TaskOptions`); its fields
are the single source of truth for the Python API, the command line (``add_options_to_parser``
generates one ``--flag`` per field, with the field's ``help`` metadata) and the TOML config file
(``--config FILE``, keys are field names). Static checks live in ``check()`` (called on
construction), checks that need the model (context length, ...) in ``check_model(adapter)``.

Each task writes into its ``--out`` directory, atomically (a temporary sibling directory renamed
into place at the end, as ``checkpoint.save_model`` does):

* ``results.json``: task, options (every field, defaults included), seed, model and tokenizer
  identity (path, kind, config hash, weights hash), environment, the task's numbers and notes;
  only ``elapsed_s`` differs between two runs with the same seed;
* ``results.md``: the same numbers as Markdown tables;
* ``*.png``: plots, drawn with matplotlib's Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..fsutil import atomic_directory
from ..utils import stats as _stats
from ..utils.errors import UsageError
from ..utils.options import (add_options_to_parser, flag, opt, options_from_args,  # noqa: F401 (re-exported)
                             options_from_mapping, read_toml)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """Options shared by every task. Subclasses add their own fields with :func:`opt`."""

    seed: int = opt(0, "random seed: every sampled prompt, order and split follows from it")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # frozen dataclass with list fields: keep a private copy
                object.__setattr__(self, f.name, list(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed must be a non-negative integer, got {self.seed!r}")
        self.check()

    def check(self) -> None:
        """Static validation (no model needed). Raise :class:`UsageError` naming the option."""

    def check_model(self, adapter) -> None:
        """Validation against the model (context length, capabilities)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "options") -> "TaskOptions":
        return options_from_mapping(cls, data, source, "unknown option(s) {names} for this task; valid: {valid}")


# --------------------------------------------------------------------------- small validators

def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UsageError(f"--{flag(name)} must be an integer {rng}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"--{flag(name)}: unknown value {value!r}; valid: {', '.join(choices)}")


def parse_nr(items: Sequence[str]) -> list[tuple[int, int]]:
    """``["1/1", "6/2"]`` -> ``[(1, 1), (6, 2)]`` (N needles, R queried); N >= R >= 1."""
    out = []
    for item in items:
        parts = str(item).split("/")
        try:
            n, r = (int(p) for p in parts)
        except ValueError:
            raise UsageError(f"--nr: {item!r} is not N/R (e.g. 6/2)") from None
        if r < 1 or n < 1:
            raise UsageError(f"--nr {item}: N and R must be >= 1")
        if n < r:
            raise UsageError(f"--nr {item}: N={n} needles < R={r} queried needles (need N >= R)")
        out.append((n, r))
    if not out:
        raise UsageError("--nr: give at least one N/R pair")
    return out


# --------------------------------------------------------------------------- seeding

def seeded(seed: int, *salt: Any) -> random.Random:
    """A ``random.Random`` whose stream depends only on ``(seed, *salt)`` (stable across runs/processes)."""
    import hashlib

    key = json.dumps([seed, *[str(s) for s in salt]]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def start_task(adapter, options) -> float:
    """What every task does first: check the options against the model, seed every generator; returns the
    start time (for the record's wall time)."""
    started = time.time()
    options.check_model(adapter)
    seed_everything(options.seed)
    return started


def require_text_and_context(options, adapter) -> None:
    """``check_model`` of the tasks that read held-out text with an optional ``--seq-len``."""
    if options.data is None:
        raise UsageError("--data is required: held-out text (a shard dir, text file/dir, .jsonl, or source name)")
    if options.seq_len is not None and options.seq_len > adapter.max_len:
        raise UsageError(f"--seq-len {options.seq_len} is above the model's context ({adapter.max_len} tokens)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- numbers

def mean(xs: Sequence[float]) -> float | None:
    """Mean of the values that are not None (utils/stats.py)."""
    return _stats.mean(xs)


def std(xs: Sequence[float]) -> float | None:
    """Population standard deviation (ddof=0) of one run's per-sample scores; None for an empty list."""
    return _stats.population_std(xs)


def rounded(value: Any, digits: int = 6) -> Any:
    """Round floats recursively for JSON (stable text, no 0.30000000000000004)."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        out.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- plots

def new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display), and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, (axes[0] if ncols == 1 else list(axes))


def integer_xaxis(ax) -> None:
    """Integer ticks on the x axis (layers, shot counts)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------- results

@dataclass
class TaskResult:
    """What a task computed: ``data`` (JSON-able numbers), Markdown, figures, notes."""

    task: str
    data: dict[str, Any]
    markdown: str
    figures: dict[str, Any] = field(default_factory=dict)  # file name (.png) -> matplotlib Figure
    notes: list[str] = field(default_factory=list)


def build_record(result: TaskResult, adapter, tokenizer, options: TaskOptions, elapsed: float) -> dict[str, Any]:
    from .._version import __version__

    from importlib.metadata import PackageNotFoundError, version

    try:
        tf_version = version("transformers")  # without importing it (slow)
    except PackageNotFoundError:  # pragma: no cover - transformers is a core dependency
        tf_version = None
    return rounded({
        "task": result.task,
        "diffattn_version": __version__,
        "seed": options.seed,
        "options": options.to_dict(),
        "model": adapter.identity(),
        "tokenizer": tokenizer.identity() if tokenizer is not None else None,
        "environment": {"torch": torch.__version__, "transformers": tf_version,
                        "device": str(getattr(adapter, "device", "cpu")), "dtype": str(getattr(adapter, "dtype", ""))},
        "results": result.data,
        "notes": result.notes,
        "files": [RESULTS_JSON, RESULTS_MD, *sorted(result.figures)],
        "elapsed_s": elapsed,
    })


def render_markdown(result: TaskResult, record: dict[str, Any]) -> str:
    model = record["model"]
    lines = [f"# diffattn eval {result.task}", "",
             f"- model: `{model.get('path')}` ({model.get('kind')}, {model.get('architecture')}, "
             f"config sha256 `{str(model.get('config_sha256'))[:12]}`)",
             f"- seed: {record['seed']}",
             "- options: " + ", ".join(f"`{k}={v!r}`" for k, v in record["options"].items() if k != "seed"), ""]
    for note in result.notes:
        lines.append(f"> {note}")
    if result.notes:
        lines.append("")
    lines.append(result.markdown.rstrip())
    for name in sorted(result.figures):
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | os.PathLike, record: dict[str, Any], markdown: str, figures: Mapping[str, Any]) -> Path:
    """Write results.json, results.md and the PNGs into ``out_dir`` atomically (temp dir + rename)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    with atomic_directory(out) as tmp:
        (tmp / RESULTS_JSON).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        (tmp / RESULTS_MD).write_text(markdown)
        for name, fig in figures.items():
            fig.savefig(tmp / name, dpi=110)
    return out


def finish(result: TaskResult, adapter, tokenizer, options: TaskOptions, out_dir, started: float) -> dict[str, Any]:
    """Assemble the record, write it (when ``out_dir`` is given) and return it."""
    record = build_record(result, adapter, tokenizer, options, time.time() - started)
    if out_dir is not None:
        write_outputs(out_dir, record, render_markdown(result, record), result.figures)
    return record


__all__ = ["TaskOptions", "TaskResult", "UsageError", "opt", "check_int", "check_choice", "parse_nr",
           "add_options_to_parser", "options_from_args", "read_toml", "seeded", "seed_everything", "start_task",
           "require_text_and_context", "mean", "std",
           "markdown_table", "new_figure", "write_outputs", "finish", "fmt"]

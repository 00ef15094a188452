"""Shared pieces of ``diffattn bench``: the compared shapes, timing, memory, output (the environment record:
utils/environment.py).

Timing: every row is warmed up, then timed ``repeats`` times *round-robin* (one repeat of each row,
then the next), so slow phases of a shared machine hit every row alike; CUDA is synchronised around
each timed call. A row reports the median and the spread (min, max, quartiles) of its repeats, and
its ratio to the baseline row (the standard Transformer at the same shape).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` around one step after a reset. On CPU, torch
has no allocator statistics (and tracemalloc does not see its allocations), so each row is run in a
fresh child process and we report that child's peak resident set size (``getrusage`` ru_maxrss)
minus its RSS just before building the model: parameters, gradients, optimizer state and the
activations of the step, plus allocator overhead. A fresh process per row keeps one row's freed
memory from hiding the next row's peak, and glibc's mmap threshold is pinned at 1 MiB there so that
freed tensors go back to the OS and RSS tracks live memory (see train.measure_memory).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import presets, variants
from ..fsutil import write_text_atomic
from ..utils.errors import UsageError
from ..utils.runtime import DTYPES as RUNTIME_DTYPES
from ..utils.timing import Timing, round_robin, sync  # noqa: F401 (re-exported for the benchmarks)
from ..config import ModelConfig

DTYPES = {name: RUNTIME_DTYPES[name] for name in ("fp32", "bf16", "fp16")}  # the short names of utils.runtime
REFERENCE_ROWS = ("authors_split_value", "diffllama")  # extra rows, beside our variants


@dataclass(frozen=True)
class Shape:
    """The baseline Transformer every row is matched to (``n_head`` standard heads of ``head_dim``)."""

    batch: int
    seq_len: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_layer: int
    vocab_size: int
    max_seq_len: int


def shape_for(args, seq_len: int, batch: int | None = None) -> Shape:
    return Shape(batch=batch if batch is not None else args.batch, seq_len=seq_len, d_model=args.d_model, n_head=args.n_head,
                 n_kv_head=args.n_kv_head, head_dim=args.head_dim, n_layer=getattr(args, "n_layer", 1),
                 vocab_size=getattr(args, "vocab_size", 256), max_seq_len=args.max_seq_len)


def bench_config(shape: Shape, variant: str, kernel: str) -> tuple[ModelConfig, str]:
    """(config, how it is matched) of ``variant`` for a benchmark shape (the baseline's heads are ``shape``'s).
    Parameter-matched (presets.matched) where the head counts allow; a variant whose output heads each read several
    query heads (DIFF V2: ``query_heads_per_head`` 2) falls back to the same *query* width when they do not (for V2:
    n_head/2 output heads, i.e. n_head query heads: the blog's "identical kernel speed" pair). Not to be confused
    with the comparison study's ``experiments.presets.variant_config`` (parameter matching only)."""
    try:
        base = ModelConfig(attention=variants.BASELINE, vocab_size=shape.vocab_size, d_model=shape.d_model,
                           n_layer=shape.n_layer, n_head=shape.n_head, n_kv_head=shape.n_kv_head,
                           head_dim=shape.head_dim, max_seq_len=shape.max_seq_len, kernel=kernel)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if variant == variants.BASELINE:
        return base, "baseline"
    try:
        return presets.matched(base, variant), "parameters"
    except ValueError:
        from ..model.attention import attention_class  # the model code loads with the first benchmark, not --help

        per = attention_class(variant).query_heads_per_head
        if per == 1:
            raise
    h = shape.n_head // per
    kv = h if shape.n_kv_head == shape.n_head else shape.n_kv_head
    if h % kv:
        raise UsageError(f"{variant} with {h} output heads cannot share {kv} K/V heads; change --n-kv-head")
    return ModelConfig.from_dict({**base.to_dict(), "attention": variant, "n_head": h, "n_kv_head": kv}), "query width"


# ---------------------------------------------------------------------------------------------- timing
# sync, Timing, round_robin: utils/timing.py (experiments/compare.py times with them too)


# ---------------------------------------------------------------------------------------------- output
def write_json(path: str | None, payload: dict) -> None:
    """Write atomically (temp file in the target directory, then rename)."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--json {path}: is a directory")
    if not target.parent.exists():
        raise UsageError(f"--json {path}: directory {target.parent} does not exist")
    write_text_atomic(target, json.dumps(payload, indent=1) + "\n")


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()


def fmt_ms(s: dict) -> str:
    return f"{s['median_s'] * 1e3:.1f} [{s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}]"


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def options(args) -> dict:
    """The resolved command-line options, for the JSON record."""
    keys = ("device", "dtype", "kernel", "batch", "seq_len", "new_tokens", "d_model", "n_head", "n_kv_head",
            "head_dim", "n_layer", "vocab_size", "max_seq_len", "warmup", "repeats", "compile", "references",
            "variant_list", "memory", "peak_tflops")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}

"""The benchmarks' options, one dataclass per kind (``diffattn bench attention|train|generate``).

The command's flags are these fields (utils/options.py); building one validates it and fills in what is
derived (the variant list with the baseline first, the kernel and dtype for the device, the model's
``max_seq_len``, K/V heads and head width). Shapes are the *baseline's* (``n_head`` standard heads); every
variant is parameter-matched to it. Bad values raise a one-line UsageError (exit 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from .. import variants
from ..utils.errors import UsageError
from ..utils.options import opt, options_from_mapping

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the short names of utils.runtime.DTYPES
_SHAPE = "shape (of the standard baseline; variants are parameter-matched to it)"
_RUN = "run"


@dataclass(kw_only=True)
class BenchOptions:
    """What every benchmark shares."""

    KIND: ClassVar[str] = "bench"

    device: str = opt("cpu", "where to run", choices=["cpu", "cuda"], group=_RUN)
    dtype: str | None = opt(None, "default: fp32 on cpu, bf16 on cuda", choices=list(DTYPE_NAMES), group=_RUN)
    kernel: str | None = opt(None, "kernel of the variants that fuse both maps (diff_v1/shared_diff; default: sdpa "
                                   "on cpu, triton on cuda); the others use sdpa", choices=["eager", "sdpa", "triton"],
                             group=_RUN)
    variants: str = opt(",".join(variants.BUILTIN), "comma-separated variants (standard always runs)", group=_RUN)
    references: bool = opt(True, "the authors' split-value and transformers DiffLlama rows", group=_RUN)
    seq_len: list[int] = opt([2048], "sequence length(s)", nargs="+", metavar="T", group=_SHAPE)
    batch: int = opt(1, "batch size", group=_SHAPE)
    d_model: int = opt(512, "model width", group=_SHAPE)
    n_head: int = opt(16, "heads of the standard baseline", group=_SHAPE)
    n_kv_head: int | None = opt(None, "K/V heads of the baseline (default: --n-head)", group=_SHAPE)
    head_dim: int | None = opt(None, "per-head width (default: d_model / n_head)", group=_SHAPE)
    max_seq_len: int | None = opt(None, "model max_seq_len (default: the longest run needs)", group=_SHAPE)
    warmup: int = opt(2, "untimed calls per row", group=_RUN)
    repeats: int = opt(5, "timed repeats per row, round-robin", group=_RUN)
    json: str | None = opt(None, "also write the results (and environment) to this JSON file", group=_RUN,
                           metavar="OUT")
    quiet: bool = opt(False, "no progress lines on stderr", switch=True, group=_RUN)
    # derived in __post_init__
    variant_list: list[str] = field(init=False, default_factory=list)
    torch_dtype: Any = field(init=False, default=None)

    n_layer: ClassVar[int] = 1
    vocab_size: ClassVar[int] = 256

    def __post_init__(self) -> None:
        import torch

        from ..utils.runtime import DTYPES

        self.seq_len = list(self.seq_len)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
        if self.kernel == "triton" and self.device != "cuda":
            raise UsageError("--kernel triton runs on a GPU; use --device cuda (on CPU use sdpa or eager)")
        chosen = [v.strip() for v in self.variants.split(",") if v.strip()]
        bad = [v for v in chosen if v not in variants.names()]
        if bad or not chosen:
            raise UsageError(f"--variants: unknown variant {bad[0] if bad else '(none)'!r}; "
                             f"valid: {', '.join(variants.names())}")
        self.variant_list = list(dict.fromkeys([variants.BASELINE, *chosen]))  # the baseline always runs, first
        for name in ("batch", "d_model", "n_head", "n_layer", "vocab_size", "warmup", "repeats", "new_tokens"):
            values = getattr(self, name, None)
            lo = 0 if name == "warmup" else 1
            for value in values if isinstance(values, list) else [values]:
                if value is not None and value < lo:
                    raise UsageError(f"--{name.replace('_', '-')} must be >= {lo}, got {value}")
        extra = getattr(self, "new_tokens", 0) or 0  # generate: the cache holds prompt + new tokens
        if self.max_seq_len is None:
            self.max_seq_len = max(self.seq_len) + extra
        for t in self.seq_len:
            if t < 2:
                raise UsageError(f"--seq-len must be >= 2, got {t}")
            if t + extra > self.max_seq_len:
                what = f"--seq-len {t} + --new-tokens {extra}" if extra else f"--seq-len {t}"
                raise UsageError(f"{what} exceeds --max-seq-len {self.max_seq_len}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise UsageError(f"--d-model {self.d_model} is not divisible by --n-head {self.n_head} "
                                 f"(or give --head-dim)")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % 2 or self.n_kv_head % 2:
            raise UsageError(f"--n-head/--n-kv-head must be even (a DIFF head replaces two standard heads), "
                             f"got {self.n_head}/{self.n_kv_head}")
        if self.kernel is None:
            self.kernel = "triton" if self.device == "cuda" else "sdpa"
        self.dtype = self.dtype or ("bf16" if self.device == "cuda" else "fp32")
        self.torch_dtype = DTYPES[self.dtype]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "options") -> "BenchOptions":
        return options_from_mapping(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        """The resolved options, for the JSON record."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "torch_dtype"}
        return {**out, "n_layer": self.n_layer, "vocab_size": self.vocab_size}


@dataclass(kw_only=True)
class AttentionBench(BenchOptions):
    """One attention layer of every variant and the attention core alone, forward and forward+backward."""

    KIND: ClassVar[str] = "attention"
    compile: bool = opt(False, "torch.compile every row", switch=True, group=_RUN)


@dataclass(kw_only=True)
class TrainBench(BenchOptions):
    """Whole-model training steps of every variant: tokens/s, peak memory, MFU on a GPU."""

    KIND: ClassVar[str] = "train"
    n_layer: int = opt(4, "layers", group=_SHAPE)
    vocab_size: int = opt(8192, "vocabulary", group=_SHAPE)
    compile: bool = opt(False, "torch.compile every row", switch=True, group=_RUN)
    memory: bool = opt(True, "measure peak memory", group=_RUN)
    memory_only: bool = opt(False, "measure peak memory only (no timing)", switch=True, group=_RUN)
    peak_tflops: float | None = opt(None, "device peak for MFU (default: known GPUs, bf16/fp16)", group=_RUN)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_only and not self.memory:
            raise UsageError("--memory-only and --no-memory contradict each other")


@dataclass(kw_only=True)
class GenerateBench(BenchOptions):
    """Prefill and KV-cache decode throughput of every variant."""

    KIND: ClassVar[str] = "generate"
    seq_len: list[int] = opt([1024], "prompt length(s)", nargs="+", metavar="T", group=_SHAPE)
    batch: list[int] = opt([1], "batch size(s)", nargs="+", metavar="B", group=_SHAPE)
    n_layer: int = opt(4, "layers", group=_SHAPE)
    vocab_size: int = opt(8192, "vocabulary", group=_SHAPE)
    new_tokens: int = opt(32, "tokens to decode", group=_RUN)

    def __post_init__(self) -> None:
        self.batch = list(self.batch)
        super().__post_init__()


__all__ = ["BenchOptions", "AttentionBench", "TrainBench", "GenerateBench", "DTYPE_NAMES"]

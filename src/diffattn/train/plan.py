"""Planning a training run, validation only: :func:`plan_run` / :func:`plan_configs` open the data once, check every
input once (configs, data, token ids, memory, batch divisibility, the resume checkpoint and its config) and return a
:class:`RunPlan` that carries the opened shards; nothing is written. The trainer (train/trainer.py) trusts it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import read_config
from ..config import ModelConfig
from ..data.loader import TokenShards, WindowSampler, n_eval_windows
from ..model import build_model
from . import distributed as D
from .checkpoint import latest_checkpoint, latest_intact_checkpoint, read_train_state
from .config import TrainConfig, resolve_model_config


@dataclass(frozen=True, eq=False)
class RunPlan:
    """A validated run: nothing has been written yet. Carries the opened data (shards, window length)."""

    model_config: ModelConfig
    train_config: TrainConfig
    resume_from: Path | None
    changed: tuple[str, ...]  # TrainConfig fields that differ from the resumed checkpoint's
    train_shards: TokenShards
    val_shards: TokenShards
    seq_len: int
    world_size: int

    def window_sampler(self) -> WindowSampler:
        """The run's own data order (what ``Trainer`` uses unless given another sampler)."""
        cfg = self.train_config
        return WindowSampler(self.train_shards, self.seq_len, cfg.batch_size, cfg.seed)

    def with_train(self, **changes) -> "RunPlan":
        """The same plan with ``TrainConfig`` fields changed that do not affect validation (compile, ...)."""
        return dataclasses.replace(self, train_config=self.train_config.replace(**changes))


def plan_run(tables: dict[str, dict], *, resume: bool = False, world_size: int | None = None) -> RunPlan:
    """Validate a run from ``[model]``/``[train]`` tables (configs, data directory, checkpoints, batch
    divisibility) without side effects. Raises ValueError / FileNotFoundError with one line naming the problem."""
    config = TrainConfig.from_dict(tables.get("train", {}))
    train = TokenShards(config.data, "train")
    model_config = resolve_model_config(tables.get("model", {}), train.vocab_size)
    return _plan(model_config, config, train, resume=resume, world_size=world_size)


def plan_configs(model_config: ModelConfig, config: TrainConfig, *, resume: bool = False,
                 world_size: int | None = None) -> RunPlan:
    """:func:`plan_run` for configs built in Python (the comparison study)."""
    return _plan(model_config, config, TokenShards(config.data, "train"), resume=resume, world_size=world_size)


def _plan(model_config: ModelConfig, config: TrainConfig, train: TokenShards, *, resume: bool,
          world_size: int | None) -> RunPlan:
    val = TokenShards(config.data, "val")
    if model_config.vocab_size < train.vocab_size:
        raise ValueError(f"ModelConfig.vocab_size: {model_config.vocab_size} is smaller than the data's "
                         f"vocab_size {train.vocab_size} ({Path(config.data) / 'index.json'})")
    check_memory(model_config, config)
    for shards in (train, val):  # a corrupt or foreign shard could feed the embedding ids it does not have
        check_token_ids(shards, model_config.vocab_size)
    seq_len = config.resolved_seq_len(model_config)
    WindowSampler(train, seq_len, config.batch_size, config.seed)  # enough train tokens for one window
    if n_eval_windows(val, seq_len) < 1:
        raise ValueError(f"{config.data}: split 'val' has {len(val)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    world = D.env_world_size() if world_size is None else world_size
    if config.batch_size % (world * config.grad_accum):  # the one divisibility check
        raise ValueError(f"TrainConfig.batch_size: {config.batch_size} is not divisible by world_size*grad_accum "
                         f"= {world}*{config.grad_accum}")
    common = dict(train_shards=train, val_shards=val, seq_len=seq_len, world_size=world)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"TrainConfig.out: {out} exists and is not a directory")
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
        corrupt: list[tuple[Path, Exception]] = []
        latest = latest_intact_checkpoint(out, report=lambda path, err: corrupt.append((path, err)))
        if latest is None:
            raise ValueError(f"--resume: no intact checkpoint in {out / 'checkpoints'} (newest: {corrupt[0][1]})")
        if corrupt:  # one line: which ones are skipped and why, and where the run continues
            print(f"diffattn train: skipping corrupt checkpoint {', '.join(p.name for p, _ in corrupt)} "
                  f"({corrupt[0][1]}); resuming from {latest.name}", file=sys.stderr, flush=True)
        saved = read_config(latest)
        if saved != model_config:
            diff = [k for k, v in saved.to_dict().items() if model_config.to_dict()[k] != v]
            raise ValueError(f"--resume: the model config differs from the checkpoint {latest} "
                             f"in {', '.join(diff)}")
        saved_train = read_train_state(latest).get("train_config", {})
        changed = tuple(k for k, v in config.to_dict().items() if k in saved_train and saved_train[k] != v)
        return RunPlan(model_config, config, latest, changed, **common)
    if latest is not None:
        raise ValueError(f"TrainConfig.out: {out} already holds checkpoints (latest {latest.name}); "
                         f"pass --resume to continue it or choose another out")
    return RunPlan(model_config, config, None, (), **common)


def check_memory(model_config: ModelConfig, config: TrainConfig) -> None:
    """Refuse (ValueError) a model whose fp32 weights (built on the host before moving to a GPU),
    or on CPU weights + gradients + AdamW state (16 bytes/parameter), exceed this machine's memory."""
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(model_config).parameters())
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    need = n * (16 if on_cpu else 4)
    if need > ram:
        what = "weights, gradients and AdamW state" if on_cpu else "fp32 weights (built on the host)"
        raise ValueError(f"ModelConfig: {n:,} parameters need about {need / 2**30:,.1f} GiB for {what}, more "
                         f"than this machine's {ram / 2**30:,.1f} GiB of memory")


def check_token_ids(shards: TokenShards, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Refuse (ValueError naming the file) a shard holding a token id >= ``vocab_size`` (reads all tokens)."""
    for entry, arr in zip((e for e in shards.index["splits"][shards.split] if e["tokens"]), shards._arrays):
        for lo in range(0, len(arr), chunk):
            top = int(arr[lo:lo + chunk].max())
            if top >= vocab_size:
                raise ValueError(f"{shards.dir / entry['file']}: token id {top} is out of range for vocab_size "
                                 f"{vocab_size} (corrupt or foreign shard)")


__all__ = ["RunPlan", "plan_run", "plan_configs", "check_memory", "check_token_ids"]

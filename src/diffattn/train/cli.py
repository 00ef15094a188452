"""``diffattn train``: train a model from a TOML run file (``[model]`` + ``[train]``), resumable,
under ``torchrun`` for DDP / FSDP2. See docs/training.md."""

from __future__ import annotations

import argparse
import os
import signal
import sys


def run(args: argparse.Namespace) -> int:
    from .config import load_run_file
    from .trainer import train

    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ValueError(f"--stop-at-step must be a positive step number, got {args.stop_at_step}")
    tables = load_run_file(args.config, args.set or [])

    def started(trainer) -> None:
        info, plan, cfg = trainer.info, trainer.plan, trainer.config
        if info.is_main:
            where = f"{info.world_size} x {trainer.device.type}" + (f" ({cfg.parallel})" if info.distributed else "")
            start = f"resuming at step {trainer.step}" if plan.resume_from else "from scratch"
            if plan.changed:
                start += f" (changed since the checkpoint: {', '.join(plan.changed)})"
            print(f"diffattn train: {plan.model_config.attention} model, {trainer.n_params:,} parameters, "
                  f"{trainer.total_steps} steps of {trainer.tokens_per_step:,} tokens on {where}, {start}; "
                  f"out {cfg.out}", file=sys.stderr, flush=True)

    summary = train(tables, resume=args.resume, stop_at_step=args.stop_at_step, on_start=started)
    if os.environ.get("RANK", "0") == "0":
        state = "finished" if summary["finished"] else "stopped (continue with --resume)"
        if summary.get("signal") and not summary["finished"]:
            state = f"stopped by {summary['signal']} (continue with --resume)"
        val = f", val_loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
        print(f"{state} at step {summary['step']} ({summary['tokens']:,} tokens){val}; "
              f"checkpoint {summary['checkpoint']}", flush=True)
    # stopped by a signal, after saving: the shell's convention, 128 + the signal number (Ctrl-C: 130)
    if summary.get("signal") and not summary["finished"]:
        return 128 + int(getattr(signal, summary["signal"]))
    return 0


DESCRIPTION = ("Train a decoder LM on token shards. The run file has a [model] table (ModelConfig fields, or "
               "preset = NAME with attention = VARIANT) and a [train] table (TrainConfig fields, including "
               "data = SHARD_DIR and out = RUN_DIR). Multi-process: torchrun --nproc-per-node N -m diffattn "
               "train ... (DDP; --set train.parallel=fsdp for FSDP2).")

EPILOG = ("example: diffattn train --config configs/train-tiny.toml --set train.max_steps=50 --set model.n_layer=4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="run file with [model] and [train] tables")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field: train.lr=1e-3, model.n_layer=4, parallel=fsdp (repeatable; TOML values)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in OUT/checkpoints")
    p.add_argument("--stop-at-step", type=int, metavar="N",
                   help="stop after step N with a checkpoint (as if interrupted); --resume continues the same run")
    p.set_defaults(func=run)

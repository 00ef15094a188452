"""The trainer: one optimizer step at a time, evaluation, checkpoints, exact resume, DDP/FSDP2.

Training objective: next-token cross-entropy (fp32 logits) on windows from
:class:`diffattn.data.loader.WindowSampler`. One optimizer step (:meth:`Trainer.train_step`):
set the scheduled LR (a pure function of the step, ``TrainConfig.lr_at``: train/schedule.py), run ``grad_accum``
micro-steps of this rank's slice of the step's global batch (bf16 autocast on GPU, fp32 on CPU),
clip the global gradient norm, AdamW. Nothing in a step depends on anything but the model, the
optimizer state and the step number, which is what makes resume exact: a checkpoint holds the
weights, the optimizer state, the step (= data position) and the RNG states, and a run stopped at
step k and resumed reproduces the uninterrupted run bit for bit on CPU. Under ``torchrun`` every
rank computes on a disjoint slice of the same global batch, so N processes reproduce one process
with gradient accumulation (up to float summation order).

One entry point, plan -> lock -> ``Trainer(plan, sampler=...)`` -> ``fit``::

    summary = train(tables)                                # [model]/[train] tables (load_run_file), or a RunPlan
    plan = plan_run(tables, resume=True)                   # validation only: nothing is written
    trainer = Trainer(plan)                                # or step it yourself: trainer.train_step(step)

:func:`plan_run` / :func:`plan_configs` (train/plan.py, re-exported here) open the data once, check every input
once (configs, data, token ids, batch divisibility, the resume checkpoint and its config) and return a
:class:`RunPlan` that carries the opened shards; the Trainer trusts it. The run directory's lock is taken in one
place (:func:`run_lock`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..data.loader import eval_batches, n_eval_windows
from ..model import build_model
from . import distributed as D
from ..fsutil import write_text_atomic
from ..utils.lock import DirLock
from .checkpoint import (latest_checkpoint, load_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint,
                         set_rng_state)
from .faults import NumericsGuard, nan_injected
from ..model.loss import lm_loss
from .metrics import MetricsLog, flops_per_token, lambda_values, peak_flops
from ..utils.progress import StepProgress, duration
from .optim import build_optimizer, clip_grad_norm, set_lr
from .plan import RunPlan, plan_configs, plan_run  # noqa: F401 (plan_configs: re-exported)

RUN_FILE = "run.json"


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward pass (``torch.utils.checkpoint``, non-reentrant).
    Patches each block's ``forward`` on the instance, so parameter names and state dicts are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over its micro-batches (0-d, on device; not synced)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    lr: float
    skipped: bool = False  # non-finite loss or gradient on some rank: no update was made (faults.py)


@dataclass
class _LogWindow:
    """The training steps since the last train record: their summed loss, count and time, the tokens before them."""
    loss: torch.Tensor
    n: int
    train_time: float
    tokens: int


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Builds the model, optimizer and data for one run and trains it (see the module docstring)."""

    def __init__(self, plan: RunPlan, *, sampler=None, dist_info: D.DistInfo | None = None):
        """Build the model, optimizer and data of a validated ``plan`` (:func:`plan_run`); ``sampler`` replaces
        the plan's window sampler (e.g. a needle-mixing wrapper around ``plan.window_sampler()``)."""
        if not isinstance(plan, RunPlan):
            raise TypeError(f"Trainer takes a RunPlan (plan_run / plan_configs), got {type(plan).__name__}")
        t_load = time.perf_counter()
        model_config, config = plan.model_config, plan.train_config
        self.plan, self.model_config, self.config = plan, model_config, config
        self.info = dist_info if dist_info is not None else D.setup(config)
        info = self.info
        if info.world_size != plan.world_size:
            raise ValueError(f"the run was planned for {plan.world_size} process(es), this is {info.world_size}")
        self.out = Path(config.out)
        self.device = info.device
        self.train_shards, self.val_shards, self.seq_len = plan.train_shards, plan.val_shards, plan.seq_len
        self.total_steps = config.total_steps(self.seq_len)
        self.micro_batch = config.batch_size // (info.world_size * config.grad_accum)
        self.eval_batch_size = config.eval_batch_size or self.micro_batch
        self.tokens_per_step = config.batch_size * self.seq_len
        self.sampler = sampler if sampler is not None else plan.window_sampler()
        self.autocast_dtype = self._autocast_dtype()

        optim_state, resumed = self._build_model()
        self.optimizer = build_optimizer(self.raw, config)
        self.step, self.tokens = 0, 0
        self.resumed_state = resumed
        if resumed is not None:
            self._continue_from(optim_state, resumed)
        self.peak_flops = peak_flops(self.device, config.peak_tflops)
        self.last_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self._progress: StepProgress | None = None  # while fit() runs
        self._stop = False
        self.stop_signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped fit()
        self.guard = NumericsGuard(config.max_skipped_steps, config.lambda_alarm, config.grad_spike_factor,
                                   skipped=int((resumed or {}).get("skipped_steps", 0)))
        self.load_s = time.perf_counter() - t_load  # model, optimizer, data (and the checkpoint when resuming)

    def _build_model(self) -> tuple[dict | None, dict | None]:
        """Seed torch and build the model (with the checkpoint's weights when resuming) on the device, wrapped for
        DDP/FSDP2, its blocks compiled when asked. Returns the checkpoint's optimizer state and train state."""
        config = self.config
        torch.manual_seed(config.seed)
        raw = build_model(self.model_config)
        optim_state = resumed = None
        if self.plan.resume_from is not None:  # the plan compared its config with ours
            _, model_state, optim_state, resumed = load_checkpoint(self.plan.resume_from)
            raw.load_state_dict(model_state, strict=True)
        raw.to(self.device)
        self.n_params = raw.param_counts()["total"]
        self.flops_per_token = flops_per_token(raw, self.model_config, self.seq_len)
        if config.activation_checkpointing:
            enable_activation_checkpointing(raw)
        self.model = D.wrap(raw, config, self.info)  # what train steps call (DDP wrapper or raw)
        self.raw = raw  # the DecoderLM itself (sharded in place under FSDP)
        if config.compile:
            # per block, as torchtitan: one graph reused by every layer and no graph breaks from the
            # model's input checks. Only ``forward`` is compiled, so the DDP/FSDP2 module hooks around
            # it stay eager, and parameter names do not change.
            for block in raw.layers:
                block.forward = torch.compile(block.forward)
        return optim_state, resumed

    def _continue_from(self, optim_state: dict, resumed: dict) -> None:
        """Resume: the checkpoint's optimizer state under the current config's hyper-parameters, its step and
        token counts, and this rank's RNG state."""
        config = self.config
        D.load_full_optimizer_state(self.raw, self.optimizer, optim_state)
        for group in self.optimizer.param_groups:  # hyper-parameters: the current config, by group name
            group["betas"] = (config.beta1, config.beta2)
            group["eps"] = config.eps
            group["weight_decay"] = {"decay": config.weight_decay, "no_decay": 0.0}[group["name"]]
        self.step, self.tokens = int(resumed["step"]), int(resumed["tokens"])
        states = resumed.get("rng") or []
        if states:
            set_rng_state(states[self.info.rank % len(states)])

    # ------------------------------------------------------------------ numerics
    def _autocast_dtype(self) -> torch.dtype | None:
        dtype = self.config.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        return torch.bfloat16 if dtype == "bf16" else None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, step: int) -> StepResult:
        """Optimizer step number ``step`` (0-based): uses the LR and the global batch of ``step``.
        Does not advance ``self.step``; :meth:`fit` does."""
        cfg, info = self.config, self.info
        lr = cfg.lr_at(step, self.total_steps)
        set_lr(self.optimizer, lr)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = cfg.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(n):
            x, y = self.sampler.batch(step, info.rank, info.world_size, micro, n)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with D.grad_sync(self.model, self.raw, cfg, info, sync=micro == n - 1):
                with self.autocast():
                    loss = lm_loss(self.model(x), y)
                    if nan_injected(step):  # test hook (faults.py)
                        loss = loss * float("nan")
                (loss / n).backward()
            loss_sum += loss.detach() / n
        grad_norm = clip_grad_norm(self.raw.parameters(), cfg.grad_clip)
        # a non-finite loss or gradient on any rank: skip the update everywhere (one sync per step)
        bad = (~torch.isfinite(torch.stack((loss_sum.float(), grad_norm.float().to(loss_sum.device))))).any()
        bad = bad.float().reshape(1)
        if info.distributed:
            D.all_reduce_max(bad, info)
        if bool(bad.item()):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss=loss_sum, grad_norm=grad_norm, lr=lr, skipped=True)
        self.optimizer.step()
        return StepResult(loss=loss_sum, grad_norm=grad_norm, lr=lr)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss on the first ``eval_tokens`` tokens of the val split (all ranks)."""
        info = self.info
        self.raw.eval()
        batches = list(eval_batches(self.val_shards, self.seq_len, self.eval_batch_size, self.config.eval_tokens))
        # rank r takes batches r, r+W, ...; every rank runs the same number of forwards (FSDP collectives),
        # a rank with no batch left re-runs batch 0 with weight 0
        rounds = math.ceil(len(batches) / info.world_size)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, tokens)
        for r in range(rounds):
            i = r * info.world_size + info.rank
            x, y = batches[i] if i < len(batches) else batches[0]
            with self.autocast():
                loss = lm_loss(self.raw(x.to(self.device)), y.to(self.device), reduction="sum")
            if i < len(batches):
                total += torch.stack((loss.double(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                   device=self.device)))
        D.all_reduce_sum(total, info)
        self.raw.train()
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Checkpoint the current step (a collective: every rank must call it; rank 0 writes)."""
        info = self.info
        model_state = D.full_model_state(self.raw)
        optim_state = D.full_optimizer_state(self.raw, self.optimizer)
        rngs = D.gather_objects(rng_state(), info)
        path = None
        if info.is_main:
            train_state = {
                "step": self.step, "tokens": self.tokens,
                "scheduler": {"schedule": self.config.schedule, "lr": self.config.lr_at(self.step, self.total_steps),
                              "warmup_steps": self.config.warmup_steps, "total_steps": self.total_steps},
                "data": {"sampler": "diffattn-window-v1", "seed": self.config.seed, "next_step": self.step,
                         "seq_len": self.seq_len, "global_batch": self.config.batch_size,
                         "data_dir": str(self.config.data),
                         "content_hash": self.train_shards.index.get("content_hash")},
                "rng": rngs, "world_size": info.world_size,
                "val_loss": self.last_val_loss, "skipped_steps": self.guard.skipped,
                "train_config": self.config.to_dict(),
                "diffattn_version": __version__, "torch_version": torch.__version__,
            }
            path = save_checkpoint(self.out, self.step, model_config=self.model_config, model_state=model_state,
                                   optimizer_state=optim_state, train_state=train_state,
                                   tokenizer_file=self.train_shards.tokenizer_file, keep=self.config.keep_checkpoints)
        D.barrier(info)
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at_step: int | None = None) -> dict:
        """Train until ``total_steps`` (or, for an interrupted run, ``stop_at_step`` / SIGINT / SIGTERM:
        then a checkpoint is saved and ``--resume`` continues). Returns a summary dict."""
        info = self.info
        target = self.total_steps if stop_at_step is None else min(self.total_steps, stop_at_step)
        resumed_at = self.step if self.resumed_state is not None else None
        if resumed_at is not None and self.step >= target:  # nothing left to train
            if self.step == self.total_steps and self._eval_record() is None:
                self._final_eval()  # killed after the final checkpoint, before the final evaluation
            return self._summary()
        with run_lock(self.out, info.is_main):
            if info.is_main:
                remove_stale_temporaries(self.out)
                self._write_run_file()
            D.barrier(info)
            return self._fit(target, resumed_at)

    def _fit(self, target: int, resumed_at: int | None) -> dict:
        cfg, info = self.config, self.info
        log = MetricsLog(self.out, enabled=info.is_main, tensorboard=cfg.tensorboard,
                         resume_step=resumed_at if resumed_at is not None else -1)
        bar = self._progress = StepProgress(f"train {self.model_config.attention}", self.total_steps,
                                            initial=self.step, enabled=info.is_main and cfg.progress)
        evaluated_at = saved_at = None
        if bar.enabled:
            what = f"from {self.plan.resume_from.name}" if self.plan.resume_from is not None else "new"
            bar.line(f"loading: {duration(self.load_s)} ({what}, {self.n_params:,} parameters)")
        try:
            with self._stop_on_signals():
                if resumed_at is None and cfg.eval_every > 0:  # the baseline at step 0
                    self._eval_and_log(log)
                    evaluated_at = 0
                t0 = time.perf_counter()
                window = self._log_window()
                while self.step < target and not self._stop_requested():
                    t_step = time.perf_counter()
                    result = self.train_step(self.step)
                    window.train_time += time.perf_counter() - t_step
                    self.step += 1
                    self.tokens += self.tokens_per_step
                    self._count_step(result, log, window)
                    bar.advance()
                    if self.step % cfg.log_every == 0 or self.step == target:
                        self._log_train(result, log, window, t0)
                        window = self._log_window()
                    # the final evaluation comes before the final checkpoint, so its train_state carries it
                    if self.step == self.total_steps or (cfg.eval_every and self.step % cfg.eval_every == 0):
                        self._eval_and_log(log)
                        evaluated_at = self.step
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                        saved_at = self.step
                if self.step == self.total_steps and evaluated_at != self.step:
                    self._eval_and_log(log)
                if saved_at != self.step and (resumed_at is None or self.step != resumed_at):
                    self.save()
        finally:
            bar.close()
            self._progress = None
            log.close()
        return self._summary()

    def _log_window(self) -> "_LogWindow":
        """An empty window: no step since the last train record."""
        return _LogWindow(loss=torch.zeros((), device=self.device), n=0, train_time=0.0, tokens=self.tokens)

    def _count_step(self, result: StepResult, log: MetricsLog, window: "_LogWindow") -> None:
        """A skipped step is logged (too many stop the run, keeping the last checkpoint); an applied one adds its
        loss to the window and its gradient norm to the spike watch."""
        if result.skipped:
            log.write(self.guard.skip(self.step, float(result.loss), float(result.grad_norm)))
            if self.guard.over_limit():
                raise self.guard.fault(self.step, self.last_checkpoint or latest_checkpoint(self.out))
        else:
            window.loss += result.loss
            window.n += 1
            for alarm in self.guard.watch_grad(self.step, float(result.grad_norm)):
                log.write(alarm)

    def _log_train(self, result: StepResult, log: MetricsLog, window: "_LogWindow", t0: float) -> None:
        """The train record of the steps in ``window``: mean loss over them and all ranks, tokens/s of the training
        steps alone (no evaluation or saving), MFU, λ; the λ alarms; the progress line."""
        info = self.info
        if self.device.type == "cuda":  # queued GPU work belongs to the training steps
            t_sync = time.perf_counter()
            torch.cuda.synchronize(self.device)
            window.train_time += time.perf_counter() - t_sync
        now = time.perf_counter()
        loss = float(D.all_reduce_sum(window.loss.clone(), info)) / max(window.n * info.world_size, 1)
        tok_s = (self.tokens - window.tokens) / max(window.train_time, 1e-9)
        record = {"kind": "train", "step": self.step, "tokens": self.tokens, "loss": loss,
                  "lr": result.lr, "grad_norm": float(result.grad_norm), "tokens_per_s": tok_s, "elapsed_s": now - t0}
        if self.peak_flops:
            record["mfu"] = tok_s * self.flops_per_token / (self.peak_flops * info.world_size)
        lams = lambda_values(self.raw)
        if lams:
            record["lambda"] = lams
        log.write(record)
        for alarm in self.guard.watch_lambda(self.step, lams):
            log.write(alarm)
        self._progress.report(self.step, loss=loss, tokens_per_s=tok_s, lambdas=lams)

    def _summary(self) -> dict:
        if self.last_val_loss is None and self.resumed_state is not None and self.step == self.resumed_state["step"]:
            # nothing trained: the run's own evaluation at this step, the record metrics.jsonl holds (a checkpoint
            # written before the final evaluation, by an older version, carries an earlier one)
            record = self._eval_record()
            self.last_val_loss = record["val_loss"] if record else self.resumed_state.get("val_loss")
        return {"step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
                "val_loss": self.last_val_loss, "checkpoint": str(self.last_checkpoint or latest_checkpoint(self.out)),
                "finished": self.step >= self.total_steps, "signal": self.stop_signal}

    def _eval_and_log(self, log: MetricsLog) -> None:
        t0 = time.perf_counter()
        loss = self.evaluate()
        if self._progress is not None and self._progress.enabled:
            self._progress.line(f"evaluation at step {self.step}: val_loss {loss:.4f} "
                                f"({duration(time.perf_counter() - t0)})")
        self.last_val_loss = loss
        log.write({"kind": "eval", "step": self.step, "tokens": self.tokens, "val_loss": loss,
                   "val_ppl": math.exp(min(loss, 700.0)),
                   "val_tokens": n_eval_windows(self.val_shards, self.seq_len, self.config.eval_tokens) * self.seq_len})

    def _eval_record(self) -> dict | None:
        """The last ``eval`` record of metrics.jsonl at the current step, or None."""
        from .metrics import METRICS_FILE

        path = self.out / METRICS_FILE
        if not path.is_file():
            return None
        found = None
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            if isinstance(rec, dict) and rec.get("kind") == "eval" and rec.get("step") == self.step:
                found = rec
        return found

    def _final_eval(self) -> None:
        """The final evaluation of a finished run that was killed before it: evaluate the final weights now and
        log the row, so the summary and metrics.jsonl are what an uninterrupted run leaves."""
        with run_lock(self.out, self.info.is_main):
            log = MetricsLog(self.out, enabled=self.info.is_main, tensorboard=self.config.tensorboard,
                             resume_step=self.step)
            try:
                self._eval_and_log(log)
            finally:
                log.close()

    def _write_run_file(self) -> None:
        record = {"model_config": self.model_config.to_dict(), "train_config": self.config.to_dict(),
                  "seq_len": self.seq_len, "total_steps": self.total_steps, "tokens_per_step": self.tokens_per_step,
                  "world_size": self.info.world_size, "parallel": self.config.parallel if self.info.distributed else None,
                  "device": str(self.device), "autocast": str(self.autocast_dtype) if self.autocast_dtype else None,
                  "params": self.n_params,
                  "diffattn_version": __version__, "torch_version": torch.__version__}
        write_text_atomic(self.out / RUN_FILE, json.dumps(record, indent=1) + "\n")

    def close(self) -> None:
        """Release the model, optimizer and process group (under torchrun: call on every rank).

        Order matters with gloo: the DDP reducer / FSDP state hold the process group, and a process
        group destroyed last from a Python finaliser can deadlock joining its worker threads. So all
        ranks meet at a barrier, drop their references, and only then destroy the group."""
        D.barrier(self.info)
        self.model = self.raw = self.optimizer = None
        gc.collect()
        D.teardown(self.info)

    # ------------------------------------------------------------------ graceful stop
    def request_stop(self) -> None:
        """Finish the current step, checkpoint and return from :meth:`fit` (also on SIGINT/SIGTERM)."""
        self._stop = True

    def _stop_requested(self) -> bool:
        if not self.info.distributed:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        return bool(D.all_reduce_max(flag, self.info).item())  # every rank stops at the same step

    @contextlib.contextmanager
    def _stop_on_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:  # second signal: give up at once
                raise KeyboardInterrupt
            self._stop = True
            self.stop_signal = signal.Signals(signum).name

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, hold: bool = True):
    """Hold ``out``'s run lock for the block (the main process only: ``hold``): one process per run
    directory, a second one refuses (OutDirLocked, exit 2). Re-entrant, so nested holders are free."""
    if not hold:
        yield
        return
    lock = DirLock(out, "diffattn train").acquire()
    try:
        yield
    finally:
        lock.release()


def train(run: dict[str, dict] | RunPlan, *, resume: bool = False, stop_at_step: int | None = None, sampler=None,
          on_start=None) -> dict:
    """The training entry point: plan -> lock -> ``Trainer(plan, sampler=sampler)`` -> ``fit``; returns the summary.

    ``run``: ``[model]``/``[train]`` tables (validated here; a run directory held by another process is refused
    before anything is read) or a :class:`RunPlan`. ``on_start(trainer)`` runs once the trainer is built."""
    main = D.env_rank() == 0
    if isinstance(run, RunPlan):
        plan = run
    else:
        out = run.get("train", {}).get("out")
        if main and isinstance(out, str) and out:  # another process on this out: refuse first (exit 2)
            DirLock(out, "diffattn train").check()
        plan = plan_run(run, resume=resume)  # validates everything; nothing written before this returns
    with run_lock(plan.train_config.out, main):  # held from before the weights load until the run ends
        trainer = Trainer(plan, sampler=sampler)
        try:
            if on_start is not None:
                on_start(trainer)
            return trainer.fit(stop_at_step=stop_at_step)
        finally:
            trainer.close()


__all__ = ["Trainer", "StepResult", "RunPlan", "plan_run", "plan_configs", "run_lock", "train", "lm_loss",
           "enable_activation_checkpointing"]

"""DEX adaptation training loop: AdamW on the adapter (or more, ``--train``), the λ schedule over T steps.

Per optimizer step t (0-based): the schedule position of every wrapper is set to t (λ(0) = 0, so the
first step only moves what does not depend on W_D), the batch of step t is a pure function of
(seed, t) (``diffattn.data.loader.WindowSampler``), the loss is next-token cross-entropy, gradients
are clipped, and the learning rate follows a linear warm-up then a cosine decay to 10 %. After the
last step the schedule position is set to the number of steps taken: that is the λ the adapter keeps.
Progress: ``metrics.jsonl`` (one JSON object per step and per evaluation); a tqdm bar on a terminal, else one
line per ``log_every`` steps (utils/progress.py); one line per evaluation and for the training with its duration.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..model.loss import lm_loss as _lm_loss
from ..train.metrics import MetricsLog
from ..train.optim import clip_grad_norm
from ..train.schedule import lr_at as schedule_lr_at
from ..utils.progress import StepProgress, duration, phase

from .surgery import DEXOutputProjection, adapter_modules, configure_trainable, set_dex_step


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0
    grad_clip: float = 1.0
    train_mode: str = "dex"
    lambda_lr: float | None = None  # peak learning rate of λ_learn (its own AdamW group); None: ``lr``
    eval_every: int = 0           # 0 = only before and after
    val_tokens: int = 32_768

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine to 10 % of the peak (``min_lr`` = 0.1·lr): the main trainer's schedule
    (train/schedule.py)."""
    return schedule_lr_at(step, lr=s.lr, warmup_steps=s.warmup_steps, total_steps=s.steps, min_lr=0.1 * s.lr)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _lm_loss(model(input_ids=x, use_cache=False).logits, y)


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> dict:
    """Mean next-token loss (and perplexity) over validation batches."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for x, y in batches:
        logits = model(input_ids=x.to(device), use_cache=False).logits
        total += float(_lm_loss(logits, y.to(device), "sum"))
        n += y.numel()
    model.train(was)
    if n == 0:
        raise ValueError("no validation tokens")
    loss = total / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": n}


def _evaluate_phase(title: str, model: nn.Module, data, settings: TrainSettings, log, times: dict | None) -> dict:
    """:func:`evaluate` on the validation batches as one timed phase (its line names the loss and tokens)."""
    with phase(title, log, times) as ph:
        result = evaluate(model, data.val_batches(settings.val_tokens))
        ph["detail"] = f"val_loss {result['val_loss']:.4f}, {result['val_tokens']:,} tokens"
    return result


def lambda_values(model: nn.Module) -> dict[int, float]:
    out = {}
    for m in adapter_modules(model):
        if isinstance(m, DEXOutputProjection):
            lam = m.current_lambda()
            out[m.layer_idx] = float(lam.detach()) if torch.is_tensor(lam) else float(lam)
    return out


@torch.no_grad()
def lambda_wd_norms(model: nn.Module) -> dict[int, float]:
    """‖λ·W_D‖_F per DEX layer: how much the differential term changes the heads' outputs (0 = the base)."""
    out = {}
    for m in adapter_modules(model):
        if isinstance(m, DEXOutputProjection):
            lam = m.current_lambda()
            lam = float(lam.detach()) if torch.is_tensor(lam) else float(lam)
            out[m.layer_idx] = abs(lam) * float(m.W_D.detach().float().norm())
    return out


def adapter_param_groups(model: nn.Module, params: list, settings: TrainSettings) -> tuple[list[dict], dict]:
    """DEX's own AdamW groups over the trainable ``params``, split by shape, not by name as the main trainer's
    are (train/optim.py reads diffattn's parameter names, not a Hugging Face model's): ``decay`` (matrices,
    ``weight_decay``), ``no_decay`` (vectors) and, when λ_learn is trained, ``lambda`` (no decay, peak learning
    rate ``lambda_lr``). Returns the groups and each group's learning rate as a multiple of the schedule's."""
    lams = {id(m.lambda_learn) for m in adapter_modules(model)
            if isinstance(m, DEXOutputProjection) and m.lambda_learn is not None}
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2 and id(p) not in lams]
    groups = [{"name": "decay", "params": decay, "weight_decay": settings.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if lams:  # λ_learn: its own group, so its reach does not hinge on the adapter's learning rate
        groups.append({"name": "lambda", "params": [p for p in params if id(p) in lams], "weight_decay": 0.0})
    lr_scale = {"decay": 1.0, "no_decay": 1.0, "lambda": (settings.lambda_lr or settings.lr) / settings.lr}
    return groups, lr_scale


def _train_step(model: nn.Module, opt, params: list, data, settings: TrainSettings, lr_scale: dict, step: int,
                device) -> tuple[float, float, float, int]:
    """Optimizer step ``step``: schedule position and learning rate, the batch of the step, loss, backward, clip,
    update. Returns (loss, learning rate, gradient norm before clipping, tokens)."""
    set_dex_step(model, step)
    lr = lr_at(step, settings)
    for group in opt.param_groups:
        group["lr"] = lr * lr_scale[group["name"]]
    x, y = data.batch(step)
    x, y = x.to(device), y.to(device)
    loss = lm_loss(model, x, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(clip_grad_norm(params, settings.grad_clip if settings.grad_clip > 0 else float("inf")))
    opt.step()
    return loss.item(), lr, gnorm, y.numel()


def _step_record(model: nn.Module, step: int, tokens: int, loss_value: float, lr: float, gnorm: float,
                 t0: float) -> tuple[dict, dict[int, float]]:
    """The metrics record of finished step ``step`` and the per-layer λ it holds."""
    lams = lambda_values(model)
    lam_mean = sum(lams.values()) / len(lams) if lams else None
    rec = {"step": step + 1, "tokens": tokens, "loss": loss_value, "lr": lr, "grad_norm": gnorm,
           "lambda_mean": lam_mean, "elapsed_s": round(time.time() - t0, 2)}
    if lams:  # every step: per-layer λ (at this step's t) and ‖λ·W_D‖ after the update
        rec.update(lambda_={str(k): round(v, 6) for k, v in lams.items()},
                   lambda_wd={str(k): round(v, 6) for k, v in lambda_wd_norms(model).items()})
        rec["lambda"] = rec.pop("lambda_")
    return rec, lams


def _train_loop(model: nn.Module, opt, params: list, data, settings: TrainSettings, lr_scale: dict, emit, *,
                progress: bool, log, log_every: int) -> tuple[int, list[float], float]:
    """The ``settings.steps`` optimizer steps with their metrics records, the evaluations every ``eval_every`` steps
    and the progress bar (or lines). Returns (tokens, the loss of every step, seconds)."""
    device = next(model.parameters()).device
    bar = StepProgress("dex", settings.steps, enabled=progress, write=log)
    t0, tokens, history = time.time(), 0, []
    t_report, tokens_report = time.perf_counter(), 0
    model.train()
    try:
        for step in range(settings.steps):
            loss_value, lr, gnorm, n_tokens = _train_step(model, opt, params, data, settings, lr_scale, step, device)
            tokens += n_tokens
            history.append(loss_value)
            rec, lams = _step_record(model, step, tokens, loss_value, lr, gnorm, t0)
            emit(rec)
            if settings.eval_every and (step + 1) % settings.eval_every == 0 and step + 1 < settings.steps:
                set_dex_step(model, step + 1)
                emit({"step": step + 1, "tokens": tokens, **evaluate(model, data.val_batches(settings.val_tokens))})
            bar.advance()
            if (step + 1) % log_every == 0 or step + 1 == settings.steps:
                now = time.perf_counter()
                recent = history[-((step % log_every) + 1):]  # the steps since the last line
                bar.report(step + 1, loss=sum(recent) / len(recent),
                           tokens_per_s=(tokens - tokens_report) / max(now - t_report, 1e-9),
                           lambdas=list(lams.values()))
                t_report, tokens_report = now, tokens
    finally:
        bar.close()
    return tokens, history, time.time() - t0


def _summary(model: nn.Module, settings: TrainSettings, tokens: int, n_trainable: int, history: list[float],
             before: dict, after: dict, elapsed: float) -> dict:
    """What :func:`train_adapter` returns."""
    return {"steps": settings.steps, "tokens": tokens, "trainable_params": n_trainable,
            "train_loss_first": history[0] if history else None,
            "train_loss_last10": sum(history[-10:]) / len(history[-10:]) if history else None,
            "val_before": before, "val_after": after, "elapsed_s": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "lambda": {str(k): round(v, 6) for k, v in lambda_values(model).items()},
            "lambda_wd": {str(k): round(v, 6) for k, v in lambda_wd_norms(model).items()}}


def train_adapter(model: nn.Module, data, settings: TrainSettings, *, metrics_dir: Path | None = None,
                  progress: bool = True, log=print, log_every: int = 10, times: dict | None = None) -> dict:
    """Train in place; ``data`` provides ``batch(step)`` and ``val_batches(max_tokens)``. Returns a summary.
    With ``metrics_dir``, one JSON record per logged step and evaluation goes to ``metrics_dir/metrics.jsonl``
    (the main trainer's MetricsLog). The step: AdamW over DEX's own groups (:func:`adapter_param_groups`: by
    shape, λ_learn apart), the main trainer's warm-up + cosine schedule (train/schedule.py, to 10 % of the peak)
    and global-norm clip (train/optim.py), the fp32 loss (model/loss.py).
    ``progress``: a bar on a terminal, else a line per ``log_every`` steps; ``log`` gets one line per phase
    (evaluation before, training, evaluation after) with its duration, and ``times`` its seconds."""
    params = configure_trainable(model, settings.train_mode)
    n_trainable = sum(p.numel() for p in params)
    groups, lr_scale = adapter_param_groups(model, params, settings)
    opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2))
    if metrics_dir is not None:
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(metrics_dir or ".", enabled=metrics_dir is not None, tensorboard=False)

    set_dex_step(model, 0)
    before = _evaluate_phase("evaluation before", model, data, settings, log, times)
    metrics.write({"step": 0, "tokens": 0, **before})
    tokens, history, elapsed = _train_loop(model, opt, params, data, settings, lr_scale, metrics.write,
                                           progress=progress, log=log, log_every=log_every)
    if times is not None:
        times["training"] = round(elapsed, 2)
    log(f"training: {duration(elapsed)} ({settings.steps} steps, {tokens / max(elapsed, 1e-9):,.0f} tok/s"
        f"{', evaluations included' if settings.eval_every else ''})")
    set_dex_step(model, settings.steps)
    model.eval()
    after = _evaluate_phase("evaluation after", model, data, settings, log, times)
    metrics.write({"step": settings.steps, "tokens": tokens, **after, "elapsed_s": round(elapsed, 2)})
    metrics.close()
    for p in model.parameters():
        p.requires_grad_(False)
    return _summary(model, settings, tokens, n_trainable, history, before, after, elapsed)

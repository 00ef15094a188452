"""AdamW with a documented weight-decay partition, and gradient-norm clipping.

Decoupled weight decay (Loshchilov & Hutter, AdamW; the DIFF paper trains with AdamW, methods.md §1.8)
is applied to the *matrices of the linear maps* only:

* decayed: every attention and FFN projection, the output head, Shared DIFF's low-rank
  ``q_down/k_down`` (A) and ``q_up/k_up`` (B) factors;
* not decayed: the token embedding (and a tied output head, which is the same tensor), every
  RMSNorm gain (block norms and the DIFF per-head norm), the DIFF V1 / Shared DIFF λ vectors
  ``lambda_q1, lambda_k1, lambda_q2, lambda_k2`` (decay would pull λ towards λ_init for no
  stated reason), and DIFF V2's ``lambda_proj`` (W_λ), which we count as a λ parameter: decay
  would pull the per-token λ = sigmoid(x W_λ) towards 0.5. ``TrainConfig.decay_lambda_proj=True``
  treats W_λ as an ordinary projection instead (the V2 blog does not say; UNCONFIRMED).

Parameters are partitioned by the model's buckets (``DecoderLM.param_buckets``: the embedding by its module,
λ and norm tensors by the variant class's ``PARAM_BUCKETS``), never by a variant's parameter names, so a
registered variant's λ tensors are treated as the built-ins' are. :func:`param_groups` asserts every parameter
lands in exactly one group.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig


def is_no_decay(bucket: str, param: torch.Tensor, decay_lambda_proj: bool = False) -> bool:
    """True for parameters excluded from weight decay (see the module docstring): vectors and scalars (norm
    gains, λ vectors), the embedding (and a tied head), and the λ bucket's matrices (DIFF V2's W_λ) unless
    ``decay_lambda_proj``."""
    if param.dim() < 2 or bucket == "embedding":
        return True
    return bucket == "attention.lambda" and not decay_lambda_proj


def param_groups(model: nn.Module, config: TrainConfig | None = None, *, weight_decay: float | None = None,
                 decay_lambda_proj: bool | None = None) -> list[dict]:
    """Two AdamW groups, named ``decay`` and ``no_decay`` (the partition of the module docstring), in the
    model's parameter order. ``weight_decay`` / ``decay_lambda_proj`` default to ``config``'s."""
    wd = config.weight_decay if weight_decay is None else weight_decay
    decay_proj = (config.decay_lambda_proj if config is not None else False) if decay_lambda_proj is None \
        else decay_lambda_proj
    buckets = model.param_buckets()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(buckets[name], p, decay_proj) else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": wd},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == sum(1 for p in model.parameters() if p.requires_grad), "parameter partition is not exact"
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the learning rate is set by the trainer before every step."""
    return torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Global gradient norm before clipping (a plain tensor, also for FSDP's DTensors); clips when
    ``max_norm > 0``. With ``max_norm = 0`` nothing is changed."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


__all__ = ["is_no_decay", "param_groups", "build_optimizer", "set_lr", "clip_grad_norm"]

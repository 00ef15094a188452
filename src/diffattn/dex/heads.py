"""DEX head selection: a calibration pass scoring every attention head, then a per-layer choice.

DEX targets "a layer-specific subset of attention heads" chosen by an offline, data-driven criterion
favouring **high-entropy / low-importance** heads (methods.md §4.3; the exact criterion, fraction and
calibration data are UNCONFIRMED). Our documented reading:

* **entropy** of head (l, h): the mean over calibration windows and query positions i ≥ 1 of the
  normalised attention entropy  −Σ_j p_ij log p_ij / log n_i,  n_i = number of keys query i may see
  (i + 1, or the sliding window when smaller). 1 = uniform over the visible context (a "noisy" head
  that spreads attention), 0 = one-hot. Computed from the eager softmax maps of the base model.
* **importance** of head (l, h): the increase of the mean next-token loss on the calibration windows
  when that head's output O_h is zeroed before ``o_proj`` (one ablation per head, Michel et al. 2019
  style). Costs L·H extra partial forward passes: layers before l are not recomputed (their outputs
  and each layer's positional/mask arguments are cached and replayed).
* **selection** (``--heads``): per layer, the k = max(1, ⌊fraction·H + ½⌋) heads with the highest
  entropy (``entropy``, the default: one forward pass) or the lowest importance (``importance``);
  ``all`` takes every head; ``LAYER:HEAD,...`` lists them explicitly. Ties go to the lower index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..model.loss import next_token_loss

from .surgery import attention_sites

CRITERIA = ("entropy", "importance", "all")


def _windows(batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    out = [b if b.dim() == 2 else b.unsqueeze(0) for b in batches]
    if not out:
        raise ValueError("calibration needs at least one window of tokens")
    return out


def _sliding_window(model: nn.Module, attn: nn.Module) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(model.config, "sliding_window", None)  # Mistral keeps it on the config only


class _EagerAttention:
    """Context manager: switch the model to eager attention (materialised softmax maps), then back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.prev = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        return self.model

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.prev)


@torch.no_grad()
def attention_entropy(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(L, H) mean normalised attention entropy of every head over the calibration windows (see docstring)."""
    sites = attention_sites(model)
    L, H = len(sites), sites[0].n_head
    total = torch.zeros(L, H, dtype=torch.float64)
    count = torch.zeros(L, dtype=torch.float64)
    hooks = []

    def make_hook(site):
        window = _sliding_window(model, site.attn)

        def hook(_mod, _inp, out):
            w = out[1]                                                    # (B, H, T, S) softmax maps
            if w is None:
                raise RuntimeError("attention weights were not returned (eager attention required)")
            w = w.double()
            T, S = w.shape[-2], w.shape[-1]
            ent = -(w * torch.log(w.clamp_min(1e-300))).sum(-1)           # (B, H, T)
            q = torch.arange(T, dtype=torch.float64) + (S - T)            # absolute query positions
            n = q + 1
            if window:
                n = n.clamp(max=window)
            keep = n > 1                                                  # position 0 sees one key: entropy 0/0
            norm = ent[..., keep] / torch.log(n[keep])                    # (B, H, T')
            total[site.layer_idx] += norm.sum(dim=(0, 2)).cpu()
            count[site.layer_idx] += norm.shape[0] * norm.shape[2]
        return hook

    was_training = model.training
    model.eval()
    try:
        with _EagerAttention(model):
            for s in sites:
                hooks.append(s.attn.register_forward_hook(make_hook(s)))
            # the decoder only (``base_model``): the maps are the same, and the output head over the vocabulary,
            # a fifth of SmolLM2's forward, is not needed for entropy
            decoder = getattr(model, "base_model", None) or model
            for ids in _windows(batches):
                decoder(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if (count == 0).any():
        raise ValueError("calibration windows must be at least 2 tokens long")
    return (total / count[:, None]).float()


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return next_token_loss(logits, ids, "sum")


def _final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Decoder output → logits the way the CausalLM heads of the supported families do it."""
    logits = model.lm_head(model.model.norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _capture_layer_inputs(model: nn.Module, windows: list[torch.Tensor], n_layer: int):
    """One forward pass per window: every decoder layer's (args, kwargs), captured by pre-hooks, the mean next-token
    loss of the base model and the number of predicted tokens."""
    layers = model.model.layers
    captured: list[list[tuple]] = [[None] * n_layer for _ in windows]

    def capture(i):
        def pre(_mod, args, kwargs):
            captured[w_idx][i] = (args, kwargs)
        return pre

    base_loss, n_tok = 0.0, 0
    hooks = [layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in range(n_layer)]
    try:
        for w_idx, ids in enumerate(windows):
            ids = ids.to(model.device)
            base_loss += float(_lm_loss(model(input_ids=ids, use_cache=False).logits, ids))
            n_tok += ids[:, 1:].numel()
    finally:
        for h in hooks:
            h.remove()
    base_loss /= n_tok
    return captured, base_loss, n_tok


def _replay_from(layers, inputs: list[tuple], first: int) -> torch.Tensor:
    """The last decoder layer's output, recomputing layers ``first``, ``first`` + 1, … from the captured inputs of
    layer ``first`` with every layer's own captured positional/mask arguments."""
    args, kwargs = inputs[first]
    hidden = args[0] if args else kwargs["hidden_states"]
    for j in range(first, len(inputs)):
        a, kw = inputs[j]
        if a:
            hidden = layers[j](hidden, *a[1:], **kw)
        else:
            hidden = layers[j](**{**kw, "hidden_states": hidden})
    return hidden


def _replayed_loss(model: nn.Module, windows: list[torch.Tensor], captured: list[list[tuple]], layer: int) -> float:
    """The summed next-token loss over the windows, with the decoder replayed from ``layer`` on."""
    loss = 0.0
    for w_idx, ids in enumerate(windows):
        ids = ids.to(model.device)
        hidden = _replay_from(model.model.layers, captured[w_idx], layer)
        loss += float(_lm_loss(_final_logits(model, hidden), ids))
    return loss


@torch.no_grad()
def head_importance(model: nn.Module, batches: Iterable[torch.Tensor], progress=None) -> tuple[torch.Tensor, float]:
    """(L, H) increase of the mean next-token loss when each head's output is zeroed, and the base loss.

    Layers before the ablated one are not recomputed: each decoder layer's inputs are captured once and
    the tail l..L−1 is replayed with the same positional/mask arguments.
    """
    sites = attention_sites(model)
    L, H, d = len(sites), sites[0].n_head, sites[0].head_dim
    windows = _windows(batches)
    was_training = model.training
    model.eval()
    captured, base_loss, n_tok = _capture_layer_inputs(model, windows, L)

    importance = torch.zeros(L, H, dtype=torch.float64)
    ablate = {"head": None}

    def zero_head(_mod, args):
        h = ablate["head"]
        x = args[0].clone()
        x[..., h * d:(h + 1) * d] = 0
        return (x,) + tuple(args[1:])

    try:
        for site in sites:
            l = site.layer_idx
            hook = site.attn.o_proj.register_forward_pre_hook(zero_head)
            try:
                for h in range(H):
                    ablate["head"] = h
                    importance[l, h] = _replayed_loss(model, windows, captured, l) / n_tok - base_loss
                    if progress is not None:
                        progress(1)
            finally:
                hook.remove()
    finally:
        model.train(was_training)
    return importance.float(), base_loss


def parse_head_list(text: str, n_layer: int, n_head: int) -> dict[int, list[int]]:
    """``"0:1,0:3,5:2"`` → {0: [1, 3], 5: [2]} (validated against the model's shape)."""
    heads: dict[int, list[int]] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            l_str, h_str = item.split(":")
            l, h = int(l_str), int(h_str)
        except ValueError:
            raise ValueError(f"--heads: {item!r} is not LAYER:HEAD (expected e.g. 0:1,0:3,5:2)") from None
        if not 0 <= l < n_layer:
            raise ValueError(f"--heads: layer {l} out of range 0..{n_layer - 1}")
        if not 0 <= h < n_head:
            raise ValueError(f"--heads: head {h} out of range 0..{n_head - 1}")
        heads.setdefault(l, [])
        if h not in heads[l]:
            heads[l].append(h)
    if not heads:
        raise ValueError("--heads: empty head list")
    return {l: sorted(hs) for l, hs in sorted(heads.items())}


def heads_per_layer(n_head: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    return max(1, min(n_head, math.floor(fraction * n_head + 0.5)))  # rounded half up


def select_heads(scores: torch.Tensor, fraction: float, *, highest: bool) -> dict[int, list[int]]:
    """Per layer, the k = max(1, ⌊fraction·H + ½⌋) heads with the highest (or lowest) score; ties → lower index."""
    L, H = scores.shape
    k = heads_per_layer(H, fraction)
    out = {}
    for l in range(L):
        order = sorted(range(H), key=lambda h: ((-1 if highest else 1) * float(scores[l, h]), h))
        out[l] = sorted(order[:k])
    return out


def all_heads(model: nn.Module) -> dict[int, list[int]]:
    return {s.layer_idx: list(range(s.n_head)) for s in attention_sites(model)}


def choose_heads(model: nn.Module, criterion: str, fraction: float, batches=None, progress=None) -> tuple[dict, dict]:
    """Apply ``--heads``: returns (layer → heads, calibration record with the scores used)."""
    sites = attention_sites(model)
    L, H = len(sites), sites[0].n_head
    if criterion == "all":
        return all_heads(model), {"criterion": "all"}
    if criterion == "entropy":
        ent = attention_entropy(model, batches)
        return select_heads(ent, fraction, highest=True), {
            "criterion": "entropy", "fraction": fraction, "entropy": [[round(float(v), 6) for v in r] for r in ent]}
    if criterion == "importance":
        imp, base = head_importance(model, batches, progress)
        return select_heads(imp, fraction, highest=False), {
            "criterion": "importance", "fraction": fraction, "base_loss": base,
            "importance": [[round(float(v), 6) for v in r] for r in imp]}
    if ":" in criterion:
        return parse_head_list(criterion, L, H), {"criterion": "explicit"}
    raise ValueError(f"--heads must be entropy, importance, all or LAYER:HEAD,... (got {criterion!r})")


def importance_cost(model: nn.Module) -> int:
    """Number of ablation passes the importance criterion makes (L·H)."""
    sites = attention_sites(model)
    return len(sites) * sites[0].n_head


__all__ = ["CRITERIA", "attention_entropy", "head_importance", "select_heads", "parse_head_list", "choose_heads",
           "heads_per_layer", "all_heads", "importance_cost"]

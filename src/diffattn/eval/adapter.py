"""One model interface for every evaluation task: diffattn checkpoints and Hugging Face causal LMs.

:class:`ModelAdapter` is what a task sees — logits, greedy decoding, attention maps, per-layer
outputs, a probe on the pre-softmax attention logits, and the learned λ of differential layers.
One module per model family implements it:

* ``adapter_diffattn.py`` — :class:`DiffattnAdapter` wraps a :class:`diffattn.DecoderLM`; maps and the
  logit probe select kernels through the model's public ``using_kernel``.
* ``adapter_hf.py`` — :class:`HFAdapter` wraps any ``AutoModelForCausalLM`` directory (transformers'
  attention interface for maps and the probe; DiffLlama recognised).
* DEX (``diffattn.dex``) registers its known base models and its adapter loader with ``loader.py``
  (``register_base_source``, ``register_adapter_loader``): eval never imports dex.

This module holds the interface and the shared records; ``loader.py`` finds and loads a model into the right
family adapter (:func:`~diffattn.eval.loader.load`). The family modules import this one and nothing of each
other's or the loader's.
Layer outputs (the paper's "output of each layer", after both residual additions) are collected
with forward hooks on the decoder blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..utils.errors import UsageError

_HASH_LIMIT = 2 << 30  # weights above 2 GiB are identified by size + name, not hashed


@dataclass
class LayerMaps:
    """Attention maps of one layer, float32.

    effective: (B, H, T, S) the weights each output head applies to its values (DIFF: A1 − λ·A2).
    components: (B, H, 2, T, S) the two softmax maps of each differential head, or None.
    """

    effective: torch.Tensor
    components: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ProbeSite:
    """Where a pre-softmax logit tensor comes from.

    layer: 0-based layer index.  call: index of the kernel call within the layer's forward.
    component: (Hq,) long tensor, the differential map (0 or 1) each query head of this call feeds,
        or None for ordinary attention.  duplicate: the logits equal another call's (DiffLlama's second
        call) — transform them, but do not count them twice in statistics.
    """

    layer: int
    call: int
    component: Optional[torch.Tensor] = None
    duplicate: bool = False


# fn(site, scores (B, Hq, T, S) fp32, allowed (bool, broadcastable to scores)) -> new scores or None
LogitFn = Callable[[ProbeSite, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


class ModelAdapter:
    """The interface tasks use. Subclasses (and test mocks) implement what they support."""

    kind = "abstract"
    differential = False  # has DIFF/DEX layers (λ)

    def __init__(self, *, max_len: int, vocab_size: int, n_layer: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, path: str | os.PathLike | None = None, name: str | None = None):
        self.max_len = int(max_len)
        self.vocab_size = int(vocab_size)
        self.n_layer = int(n_layer)
        self.device = torch.device(device)
        self.dtype = dtype
        self.path = None if path is None else Path(path).resolve()
        self.name = name or (_display_name(self.path) if self.path else self.kind)

    # ---- required by most tasks
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) float32 logits."""
        raise NotImplementedError(f"{type(self).__name__} does not provide logits")

    def last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, V) float32 logits of the last position."""
        return self.logits(ids)[:, -1]

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        """Greedy continuation of one prompt (a stop token, if produced, is kept and ends decoding)."""
        stop = set(int(s) for s in stop_ids)
        ids = list(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.last_logits(torch.tensor([ids + out], device=self.device)).argmax(-1)[0])
            out.append(nxt)
            if nxt in stop:
                break
        return out

    # ---- analysis hooks
    def attention_maps(self, ids: torch.Tensor, last_rows: int | None = None) -> list[LayerMaps]:
        """Per-layer maps for (B, T) ids; with ``last_rows`` only the last query rows (saves memory)."""
        raise UsageError(f"model {self.name!r} ({self.kind}) cannot return attention maps")

    def layer_outputs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        raise UsageError(f"model {self.name!r} ({self.kind}) cannot return per-layer hidden states")

    @contextmanager
    def logit_probe(self, fn: LogitFn):
        raise UsageError(f"model {self.name!r} ({self.kind}) does not expose pre-softmax attention logits")
        yield  # pragma: no cover

    def lambdas(self, batches: Iterable[torch.Tensor] = ()) -> list[dict]:
        """λ of every differential layer (empty for ordinary attention)."""
        return []

    def needs_lambda_data(self) -> bool:
        """True when λ depends on the input (DIFF V2's per-token λ): ``lambdas`` needs token batches."""
        return False

    def identity(self) -> dict:
        return {"path": str(self.path) if self.path else None, "name": self.name, "kind": self.kind,
                "architecture": None, "config_sha256": None, "weights_sha256": None, "max_len": self.max_len,
                "vocab_size": self.vocab_size, "n_layer": self.n_layer}


def collect_outputs(modules, run: Callable[[], object]) -> list[torch.Tensor]:
    """Run ``run()`` with a forward hook on each module; return their outputs (the first element of a tuple)."""
    outs: list[torch.Tensor] = []

    def hook(mod, inp, out):
        outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

    hooks = [m.register_forward_hook(hook) for m in modules]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return outs


def _display_name(path: Path) -> str:
    """``runs/tiny/checkpoints/step-000200`` -> ``tiny-step-000200``; otherwise the directory name."""
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}-{path.name}"
    return path.stem if path.suffix == ".gguf" else path.name


# =============================================================================================
# identity records (the family adapters and DEX fill ModelAdapter.identity with them)


def json_sha256(data) -> str:
    """sha256 of a JSON-able record (keys sorted)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(directory: Path | None, names: Sequence[str] | None) -> str | None:
    """sha256 over the named weight files in ``directory`` (their names and bytes); above 2 GiB, their size."""
    if directory is None or not names:
        return None
    paths = [directory / n for n in names if (directory / n).is_file()]
    if not paths:
        return None
    total = sum(p.stat().st_size for p in paths)
    if total > _HASH_LIMIT:
        return f"unhashed:{total}-bytes"
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


__all__ = ["ModelAdapter", "LayerMaps", "ProbeSite", "collect_outputs", "json_sha256", "weights_sha256"]

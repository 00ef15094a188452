"""Model directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json`` when trained on text).

The public home of the model-directory functions. Their implementation is ``model/pretrained.py``, which imports
no model class, so that ``DecoderLM.save_pretrained`` / ``from_pretrained`` (model/lm.py) use it without an import
cycle; :func:`load_model` here builds a :class:`~diffattn.model.DecoderLM`.
"""

from __future__ import annotations

import os

import torch

from .model.lm import DecoderLM
from .model.pretrained import (CONFIG_NAME, WEIGHT_PREFIX, WEIGHTS_NAME, config_from_json, config_to_json,  # noqa: F401
                               own_memory, read_config, save_model, state_dict_for_save)
from .model import pretrained as _pretrained


def load_model(directory: str | os.PathLike, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, kernel: str | None = None) -> DecoderLM:
    """Load a model directory written by :func:`save_model` (or the HF wrapper's ``save_pretrained``), with the
    command line's checks: checksums when present, every tensor name and shape against config.json."""
    return _pretrained.load_model(directory, build=DecoderLM, device=device, dtype=dtype, kernel=kernel)


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "WEIGHT_PREFIX", "config_to_json", "config_from_json", "read_config",
           "state_dict_for_save", "save_model", "own_memory", "load_model"]

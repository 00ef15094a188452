"""Model directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json`` when trained on text).

The layout is a Hugging Face model directory: ``config.json`` carries ``model_type: "diffattn"``
and every ModelConfig field, and the safetensors keys are ``model.<DecoderLM state-dict key>``,
which is what the transformers wrapper (``diffattn.hf``) stores, so
``AutoModelForCausalLM.from_pretrained(dir)`` and :func:`load_model` read the same files.
Writes are atomic: files go to a temporary sibling directory that replaces the target at the end,
so an interrupted save never leaves a half-written model directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..config import ModelConfig
from ..fsutil import atomic_directory, read_json
from ..utils.integrity import verify_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "diffattn"
WEIGHT_PREFIX = "model."


def config_to_json(config: ModelConfig) -> dict:
    return {"model_type": MODEL_TYPE, "architectures": ["DiffAttnForCausalLM"], "diffattn_version": __version__,
            **config.to_dict()}


def config_from_json(data: dict, source: str = "config.json") -> ModelConfig:
    if data.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{source}: model_type is {data.get('model_type')!r}, not {MODEL_TYPE!r}")
    known = set(ModelConfig.field_names())  # transformers' bookkeeping keys are ignored
    return ModelConfig.from_dict({k: v for k, v in data.items() if k in known})


def read_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    verify_file(directory, CONFIG_NAME)
    data = read_json(path)
    return config_from_json(data, str(path))


def state_dict_for_save(model) -> dict[str, torch.Tensor]:
    return {WEIGHT_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model, directory: str | os.PathLike, *, tokenizer_file: str | os.PathLike | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (and optionally a tokenizer.json and small text files) to ``directory`` atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_json(model.config), indent=2) + "\n")
        save_file(state_dict_for_save(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


def own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter and buffer of ``module`` its own freshly allocated storage (in place; returns it).

    safetensors' ``load_file`` (and transformers' loader) hand back tensors that view the file's bytes at
    the offset its header leaves, e.g. 24 bytes off a 64-byte boundary, where PyTorch's CPU allocator
    aligns every fresh tensor to 64 bytes. A model that adopts such tensors holds the same values, but the
    CPU matmul may take another path for unaligned operands and round differently, so its logits can
    differ in the last bits from the model that was saved. After this copy a loaded model is an ordinary
    model: it computes what the saved one computed, bit for bit. Tied tensors stay tied (one Parameter).
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not tensor.is_meta:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return module


def load_model(directory: str | os.PathLike, *, build, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, kernel: str | None = None):
    """Load a model directory written by :func:`save_model` (or the HF wrapper's ``save_pretrained``); ``build``
    makes the (meta-device) model of a config: ``DecoderLM`` (this module imports no model class, so that the
    model's own ``from_pretrained`` can use it)."""
    directory = Path(directory)
    config = read_config(directory)
    if kernel is not None:
        config = config.replace(kernel=kernel)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    verify_file(directory, WEIGHTS_NAME)  # training checkpoints carry checksums.json: a corrupt file is named
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights}: cannot read safetensors ({e})") from None
    state = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHT_PREFIX)}
    with torch.device("meta"):
        model = build(config)
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not match config.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{tuple(expected[name].shape)} (weights do not match config.json)")
    model.load_state_dict(state, assign=True)  # the file's dtypes; own_memory then copies out of its buffer
    del tensors, state
    own_memory(model)
    model = model.to(device=device) if device is not None else model
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()

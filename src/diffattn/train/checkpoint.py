"""Training checkpoints: a Hugging Face model directory plus the state that makes resume exact.

Layout (``OUT/checkpoints/step-000020/`` = the state after 20 optimizer steps)::

    config.json               ModelConfig (model_type "diffattn")        } diffattn.checkpoint.save_model:
    model.safetensors         full (unsharded) weights, "model.<key>"    } loadable by load_model and
    tokenizer.json            copied from the shard directory            } transformers' from_pretrained
    train_state.safetensors   optimizer state as tensors: "optim/<param name>/<exp_avg|exp_avg_sq|step>"
    train_state.json          step, tokens, schedule, data position, RNG states (base64/lists),
                              optimizer param groups, TrainConfig, world size
    checksums.json            sha256 + size of every other file, written last (docs/reliability.md)

Everything is safetensors or JSON: nothing is ever unpickled. :func:`save_checkpoint` is the one
writer: it fills a hidden temporary directory next to the target, fsyncs it and renames it into
place, so a directory named ``step-NNNNNN`` is always complete; then it prunes all but the last
``keep`` checkpoints. :func:`latest_checkpoint` ignores temporary and incomplete directories;
:func:`load_checkpoint` verifies ``checksums.json`` and names a corrupt file, and
:func:`latest_intact_checkpoint` finds the newest checkpoint that verifies (for ``--resume``).
A failed write (disk full, read-only directory) raises :class:`CheckpointWriteError` (one line)
and leaves the previous checkpoints as they were.
Weights and optimizer state are stored *full* (gathered from DDP/FSDP ranks by the trainer), keyed
by parameter name, so a checkpoint written by N processes resumes in M.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, WEIGHT_PREFIX, read_config, save_model
from ..config import ModelConfig
from ..fsutil import make_tempdir, read_json, replace_dir
from ..model import build_model
from ..utils.errors import CorruptFileError, RunError
from ..utils.integrity import verify_checksums, write_checksums
from .faults import checkpoint_write_point

CHECKPOINTS = "checkpoints"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
STATE_FORMAT = "diffattn-train-state-v1"
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME, STATE_TENSORS, STATE_JSON)
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (disk full, read-only or vanished directory); exit code 1."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``OUT/checkpoints``, oldest first, as (step, path)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------- optimizer state <-> tensors
def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A full, name-keyed optimizer state dict (``torch.distributed.checkpoint.state_dict`` format:
    ``{"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}``) as safetensors
    tensors plus a JSON-able description (param groups and non-tensor state values)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in osd.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for group in osd.get("param_groups", []):
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim/"):
            continue
        name, field = key[len("optim/"):].rsplit("/", 1)
        state.setdefault(name, {})[field] = value
    for name, entry in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta.get("param_groups", [])]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- RNG states as JSON
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), Python and NumPy generator states, JSON-able: the state
    arrays as base64 of their raw bytes (int64 for the Python/NumPy Mersenne-Twister words)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "python": [py_version, _b64(torch.tensor(py_internal, dtype=torch.int64)), py_gauss],
             "numpy": [np_state[0], _b64(torch.from_numpy(np_state[1].astype(np.int64))), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(_unb64(internal).view(torch.int64).tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, _unb64(keys).view(torch.int64).numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        for i in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(_unb64(saved[i]), i)


# ---------------------------------------------------------------------- the writer
def save_checkpoint(out: str | os.PathLike, step: int, *, model_config: ModelConfig,
                    model_state: dict[str, torch.Tensor], optimizer_state: dict, train_state: dict,
                    tokenizer_file: str | os.PathLike | None = None, keep: int | None = None) -> Path:
    """Write ``OUT/checkpoints/step-{step:06d}/`` atomically and keep only the last ``keep``.

    model_state: full model state dict (DecoderLM keys, CPU tensors); optimizer_state: full,
    name-keyed optimizer state (see :func:`flatten_optimizer_state`); train_state: the JSON part
    (step, tokens, scheduler, data position, RNG, TrainConfig, ...). Returns the checkpoint path.
    """
    root = Path(out) / CHECKPOINTS
    final = root / step_dir_name(step)
    try:
        return _save_checkpoint(root, final, step, model_config=model_config, model_state=model_state,
                                optimizer_state=optimizer_state, train_state=train_state,
                                tokenizer_file=tokenizer_file, keep=keep)
    except OSError as e:
        previous = [p.name for _, p in list_checkpoints(out) if p != final]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        reason = f"{e.strerror} ({e.filename})" if e.strerror and e.filename else (e.strerror or str(e))
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {reason}; {kept}") from e


def _save_checkpoint(root: Path, final: Path, step: int, *, model_config, model_state, optimizer_state,
                     train_state, tokenizer_file, keep) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_tempdir(root, final.name)
    try:
        with torch.device("meta"):
            shell = build_model(model_config)
        shell.load_state_dict(model_state, assign=True, strict=True)
        shutil.rmtree(tmp)  # save_model renames its own temporary directory onto this path
        save_model(shell, tmp, tokenizer_file=tokenizer_file)
        checkpoint_write_point("model-written", step)
        tensors, optim_meta = flatten_optimizer_state(optimizer_state)
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": STATE_FORMAT})
        checkpoint_write_point("optimizer-written", step)
        state = {"format": STATE_FORMAT, **train_state, "step": step, "optimizer": optim_meta}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
        checkpoint_write_point("state-written", step)
        write_checksums(tmp)  # last: it vouches for every byte above
        checkpoint_write_point("before-rename", step)
        replace_dir(tmp, final)  # fsyncs every file; re-saving a step moves the old one aside first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    checkpoint_write_point("renamed", step)
    if keep is not None:
        for _, path in list_checkpoints(root.parent)[:-keep]:
            doomed = root / f".{path.name}.del-{os.getpid()}"
            os.replace(path, doomed)  # hidden first: a crash mid-delete never leaves a partial step dir
            checkpoint_write_point("pruning", step)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def remove_stale_temporaries(out: str | os.PathLike) -> None:
    """Delete hidden leftovers of interrupted saves/prunes under ``OUT/checkpoints``."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".") and "step-" in path.name and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- reading
def read_train_state(path: str | os.PathLike) -> dict:
    """The ``train_state.json`` of a checkpoint directory (validated format)."""
    return read_json(Path(path) / STATE_JSON, format=STATE_FORMAT, missing="missing (not a training checkpoint)")


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Check a checkpoint's files against its checksums.json (CorruptFileError names the bad file).
    Returns False for a checkpoint written before checksums existed (only parsing checks apply)."""
    return verify_checksums(path)


def latest_intact_checkpoint(out: str | os.PathLike, report=None) -> Path | None:
    """The newest complete checkpoint under ``OUT/checkpoints`` whose files verify; for each newer
    corrupt one, ``report(path, error)`` is called (e.g. to say which one is skipped)."""
    for _, path in reversed(list_checkpoints(out)):
        try:
            verify_checkpoint(path)
            read_train_state(path)
            read_config(path)
        except (CorruptFileError, ValueError, OSError) as e:
            if report is not None:
                report(path, e)
            continue
        return path
    return None


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict, dict]:
    """(model config, full model state dict, full optimizer state dict, train_state.json) of a checkpoint.
    Verifies checksums.json first: a truncated or changed file raises CorruptFileError naming it."""
    path = Path(path)
    verify_checkpoint(path)
    config = read_config(path)
    state = read_train_state(path)
    try:
        weights = load_file(str(path / WEIGHTS_NAME))
        optim_tensors = load_file(str(path / STATE_TENSORS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read checkpoint tensors ({e})") from None
    # copies in fresh memory, not views of the files' buffers (checkpoint.own_memory says why); the optimizer
    # adopts its tensors as they are, and the model copies its own
    optim_tensors = {k: v.clone() for k, v in optim_tensors.items()}
    model_state = {k[len(WEIGHT_PREFIX):]: v for k, v in weights.items() if k.startswith(WEIGHT_PREFIX)}
    return config, model_state, unflatten_optimizer_state(optim_tensors, state.get("optimizer", {})), state


__all__ = ["CHECKPOINTS", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "latest_intact_checkpoint", "verify_checkpoint", "CheckpointWriteError",
           "read_train_state", "rng_state", "set_rng_state", "step_dir_name", "remove_stale_temporaries"]

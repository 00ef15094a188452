"""Process-group setup and model wrapping for ``torchrun`` (DDP or FSDP2), and full state dicts.

``torchrun --nproc-per-node N -m diffattn train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; with
WORLD_SIZE > 1 we join the default process group (NCCL on GPU, gloo on CPU, or ``TrainConfig.backend``)
and wrap the model:

* ``parallel = "ddp"``: ``DistributedDataParallel``; gradient accumulation skips the all-reduce on
  all but the last micro-step (``no_sync``).
* ``parallel = "fsdp"``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every decoder block and
  then on the whole model (parameters become sharded DTensors); gradient sync is switched off for
  all but the last micro-step (``set_requires_gradient_sync``).

Checkpoints never store shards: :func:`full_model_state` / :func:`full_optimizer_state` gather
name-keyed full state dicts to rank 0 (``torch.distributed.checkpoint.state_dict``), and
:func:`load_full_optimizer_state` re-shards a full one on any world size.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 outside it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """RANK set by torchrun (0 outside it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def pick_device(config: TrainConfig, local_rank: int = 0) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("TrainConfig.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(config: TrainConfig) -> DistInfo:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; pick the device."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(config, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("TrainConfig.backend: 'nccl' needs CUDA devices; use gloo on CPU")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, config: TrainConfig, info: DistInfo) -> nn.Module:
    """The module to call for training: ``model`` itself (1 process), a DDP wrapper, or ``model``
    after FSDP2 ``fully_shard`` (in place)."""
    if not info.distributed:
        return model
    if config.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def grad_sync(wrapped: nn.Module, raw: nn.Module, config: TrainConfig, info: DistInfo, sync: bool):
    """Context for one micro-step: skip the gradient all-reduce / reduce-scatter unless ``sync``."""
    if not info.distributed:
        return contextlib.nullcontext()
    if config.parallel == "fsdp":
        raw.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else wrapped.no_sync()


# torch.distributed.checkpoint.state_dict is imported where it is used: importing it costs ~0.75 s, which every
# `diffattn` command paid at start-up (the trainer module is imported to build the command line).
def _dcp():
    from torch.distributed.checkpoint import state_dict

    return state_dict


def full_model_state(raw: nn.Module) -> dict[str, torch.Tensor]:
    """Full model state dict on rank 0 (empty elsewhere under FSDP); a collective when distributed."""
    sd = _dcp()
    return sd.get_model_state_dict(raw, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(raw: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full, parameter-name-keyed optimizer state on rank 0; a collective when distributed."""
    sd = _dcp()
    return sd.get_optimizer_state_dict(raw, optimizer, options=sd.StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))


def load_full_optimizer_state(raw: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full name-keyed optimizer state (every rank passes the whole dict; FSDP re-shards it)."""
    sd = _dcp()
    sd.set_optimizer_state_dict(raw, optimizer, state, options=sd.StateDictOptions(full_state_dict=True))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


__all__ = ["DistInfo", "setup", "teardown", "wrap", "grad_sync", "full_model_state", "full_optimizer_state",
           "load_full_optimizer_state", "all_reduce_sum", "all_reduce_max", "gather_objects", "barrier",
           "env_world_size", "pick_device"]

"""Multi-process (DDP) helpers that also work, as no-ops, in a single process.

Processes are started by torchrun or srun (main.py maps SLURM's variables to RANK/WORLD_SIZE/LOCAL_RANK),
and join through `env://` (MASTER_ADDR/MASTER_PORT). The backend follows the device: nccl on CUDA/ROCm,
gloo on CPU."""

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from utils.precision import resolve_device


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, device: str | None = None, timeout_min: int = 10) -> DistEnv:
    """Joins the process group when launched with several processes; picks this process's device: the
    configured one, else this process's accelerator (CUDA, ROCm, XPU, MPS...) or the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device, "training.device")
    if device.type != "cpu":
        device = torch.device(device.type, local_rank) if device.index is None else device
        torch.accelerator.set_device_index(device.index)
    if world_size > 1 and not dist.is_initialized():
        device_backend = dist.get_default_backend_for_device(device)
        if backend is not None and backend != device_backend and device.type == "cpu":
            logging.info(f"The backend '{backend}' does not run on the CPU: using '{device_backend}' instead.")
            backend = device_backend
        dist.init_process_group(backend or device_backend, timeout=timedelta(minutes=timeout_min))
    return DistEnv(rank=rank, world_size=world_size, device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; `[obj]` in a single process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    objs = [obj]
    dist.broadcast_object_list(objs, src=0)
    return objs[0]


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is True on every rank (so that all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()

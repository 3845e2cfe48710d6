"""Multi-process (DDP) helpers that also work, as no-ops, in a single process.

Processes are started by torchrun or srun (main.py maps SLURM's variables to RANK/WORLD_SIZE/LOCAL_RANK),
and join through `env://` (MASTER_ADDR/MASTER_PORT). The backend follows the device: nccl on CUDA/ROCm,
gloo on CPU."""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from utils.cli import SettingError, UserError
from utils.precision import resolve_device


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_device(name: str | None, local_rank: int) -> torch.device:
    """`name` (e.g. 'cuda:1') if it has an index, else device LOCAL_RANK of its type (default: the accelerator's),
    or device 0 where a process sees only one (SLURM binding a GPU to each task); SettingError where the processes
    of a node would share a device."""
    device = resolve_device(name, "training.device")
    if device.type in ("cpu", "meta"):
        return device
    n = torch.accelerator.device_count()
    # the processes of this node that see the same devices: all of torchrun's; srun's tasks, unless each is bound to one
    k = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1 if n > 1 else 1))
    if k > (n if device.index is None else 1):
        raise SettingError(
            f"{k} processes on this node would share {n if device.index is None else 'one'} {device.type} device(s): "
            f"start one per device (torchrun --nproc-per-node, srun --gpus-per-task=1), naming no device index."
        )
    return device if device.index is not None else torch.device(device.type, local_rank % n)


def init_distributed(backend: str | None = None, device: str | None = None, timeout_min: float = 10) -> DistEnv:
    """Joins the process group (collectives fail after `timeout_min` minutes) when launched with several
    processes; picks this process's device (`process_device`)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = process_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type not in ("cpu", "meta"):
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


def read_on_rank0(read: Callable):
    """`read()` on rank 0, its result sent to every rank (pickled, in one message): the files it reads, such as the
    checkpoints only rank 0 writes, need not be on a file system that all nodes share. Rank 0's error stops all."""
    if not is_distributed():
        return read()
    payload = None
    if dist.get_rank() == 0:
        try:
            payload = (read(), None)
        except Exception as e:
            broadcast_object((None, str(e)))
            raise
    result, error = broadcast_object(payload)
    if error is not None:
        raise UserError(f"on rank 0: {error}")
    return result


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

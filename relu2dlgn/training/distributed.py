"""Several processes (``torchrun``): the process group, metric reduction, and loaders with samplers."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data import ShardSampler
from ..errors import InputError


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def init_distributed() -> tuple[int, int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU.

    Returns ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` when not launched by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), local


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes, in place (a no-op in one process)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def distributed_loader(loader: DataLoader, *, train: bool, seed: int) -> DataLoader:
    """The same loader with a ``DistributedSampler`` (training) or a disjoint shard (evaluation), unless it
    already has one; ``batch_size`` stays per process."""
    from torch.utils.data.distributed import DistributedSampler

    if loader.batch_size is None:
        raise InputError("distributed training needs DataLoaders with a batch_size (not a batch_sampler)")
    if isinstance(loader.sampler, (DistributedSampler, ShardSampler)):
        return loader
    shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
    rank, world = dist.get_rank(), dist.get_world_size()
    if train:
        sampler: Any = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                          drop_last=loader.drop_last)
    else:
        sampler = ShardSampler(len(loader.dataset), rank, world)  # type: ignore[arg-type]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)

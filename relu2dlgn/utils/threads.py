"""The device and torch's intra-op thread count of a training job: one rule each, applied once.

On the CPU the jobs of this package train small models on small images, where torch's own thread pool (one
thread per core) gains little and loses much when the cores are shared: measured on a 2-core machine running a
test suite beside it, a distillation epoch of timm resnet10t on the digits took 8.4 s with one thread and 16.5 s
with two. So a job on the CPU uses one thread unless told otherwise; on a GPU torch's default is kept.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import OptionError


def job_device(name: str | None) -> torch.device:
    """The device a job trains on: ``name`` (the ``device`` option), or the current CUDA device when there is one,
    else the CPU. Raises :class:`OptionError` when ``name`` asks for CUDA and there is none."""
    if name is not None:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"finetune option device={name!r}: CUDA is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def job_threads(threads: int | None, device: torch.device) -> int | None:
    """The intra-op threads to set: ``threads`` when given, 1 for a CPU job, ``None`` (torch's own) otherwise."""
    if threads:
        return threads
    return 1 if device.type == "cpu" else None


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None``: unchanged), restored after it."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""A whole fine-tuning job from specs: build the source network, load the data, convert, fine-tune, save.

This is what ``relu2dlgn finetune`` runs; its options (:class:`FinetuneJob`) are the union of the model, data,
conversion and training option groups, and the resolved job is written to ``OUT/config.yaml`` so that
``relu2dlgn finetune --config OUT/config.yaml`` repeats it exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..convert import ConvertOptions, convert
from ..data import Data, DataOptions, load_data, make_loader
from ..errors import OptionError
from ..options import group, option, save_file, to_dict
from ..zoo import ModelOptions, create_model
from .api import finetune, fresh_dlgn
from .config import FinetuneConfig
from .distributed import barrier, init_distributed
from .results import FinetuneResult

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass
class FinetuneJob:
    """Everything ``relu2dlgn finetune`` needs: which network, which data, how to convert, how to train."""

    source: ModelOptions = group(ModelOptions, "the source network")
    dataset: DataOptions = group(DataOptions, "the data")
    conversion: ConvertOptions = group(ConvertOptions, "how the source is converted")
    from_scratch: bool = option(False, "start the DLGN from a random initialisation (independent for the gating "
                                       "and the value network) instead of the source's weights")
    training: FinetuneConfig = group(FinetuneConfig, "fine-tuning")

    def check(self) -> None:
        if not self.source.model:
            raise OptionError("a model is required: MODEL on the command line, or 'model' in the config file")
        if self.training.distillation.distill and not self.source.checkpoint:
            raise OptionError("--distill needs --checkpoint: the source model must be trained to be a teacher")

    def default_out_dir(self) -> str:
        model = (self.source.model or "model").replace(":", "-")
        data = self.dataset.data.replace(":", "-").replace("/", "_")
        return os.path.join("runs", f"finetune-{model}-{data}")


def _loaders(data: Data, opts: DataOptions, world: int, seed: int, cuda: bool) -> tuple[Any, Any]:
    if opts.batch_size % world:
        raise OptionError(f"batch_size={opts.batch_size} is not divisible by the {world} processes")
    workers = opts.workers if opts.workers is not None else (
        0 if opts.data == "digits" else min(8, max(1, (os.cpu_count() or 2) // world)))
    per_process = opts.batch_size // world
    train = make_loader(data.train, per_process, train=True, workers=workers, seed=seed, pin_memory=cuda)
    val = make_loader(data.val, per_process, train=False, workers=workers, pin_memory=cuda)
    return train, val


def run_finetune_job(job: FinetuneJob) -> FinetuneResult:
    """Build, convert and fine-tune as ``job`` says; returns the :class:`FinetuneResult`. Under torchrun every
    process runs this; rank 0 writes the files."""
    job.check()
    rank, world, _ = init_distributed()
    d, t = job.dataset, job.training
    if t.output.out_dir is None:
        job = dataclasses.replace(job, training=dataclasses.replace(
            t, output=dataclasses.replace(t.output, out_dir=job.default_out_dir())))
        t = job.training
    if rank == 0 and d.download:
        load_data(d.data, d.data_root, image_size=d.image_size, channels=d.channels, download=True)
    barrier()
    data = load_data(d.data, d.data_root, image_size=d.image_size, channels=d.channels)
    seed = t.output.seed or 0
    device = t.runtime.device
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    train_loader, val_loader = _loaders(data, d, world, seed, cuda)

    kwargs: dict[str, Any] = {"num_classes": data.num_classes}
    if data.in_chans != 3:
        kwargs["in_chans"] = data.in_chans
    example = data.example_inputs()
    convert_kwargs = {**dataclasses.asdict(job.conversion), "example_inputs": example}

    def source(weights: str | None) -> nn.Module:
        return create_model(job.source.model, checkpoint=weights, **kwargs).eval()

    if job.from_scratch:
        dlgn = fresh_dlgn(lambda: source(None), seed=seed, **convert_kwargs)
    else:
        torch.manual_seed(seed)
        dlgn = convert(source(job.source.checkpoint), **convert_kwargs)
    teacher = source(job.source.checkpoint) if t.distillation.distill else None  # only a trained source teaches
    out = t.output.out_dir
    assert out is not None
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        save_file(os.path.join(out, CONFIG_FILE), to_dict(job))
        log.info("relu2dlgn finetune: %s on %s (%d train / %d val, %d classes), %d gate sites, %d process(es), "
                 "output %s", job.source.model, data.name, len(data.train), len(data.val), data.num_classes,
                 len(dlgn.sites), world, out)
    result = finetune(dlgn, train_loader, val_loader, teacher=teacher, config=t, example_inputs=example)
    if world > 1:
        torch.distributed.destroy_process_group()
    return result

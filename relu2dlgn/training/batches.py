"""What a loader yields, turned into what a step consumes: ``(inputs, class indices)`` on the device; and the
up-front check of the loaders themselves."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..errors import InputError

EMPTY_VAL = "val_loader yields no batch (an empty dataset?); pass val_loader=None to train without validation"

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def to_device(x: Any, device: torch.device | str, channels_last: bool = False) -> Any:
    """A tensor moved to ``device`` (4-d tensors in channels-last layout if asked); anything else as is."""
    if isinstance(x, torch.Tensor):
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def split_batch(batch: Any) -> tuple[tuple[Any, ...], torch.Tensor]:
    """``(inputs, targets)`` of a batch that is ``(inputs, targets)`` or ``{"input": ..., "target": ...}``;
    ``inputs`` may itself be a tuple (several model inputs). Integer targets of any width become int64 class
    indices; anything else raises :class:`InputError` naming what was found."""
    if isinstance(batch, dict) and {"input", "target"} <= set(batch):
        batch = (batch["input"], batch["target"])
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise InputError(f"a training batch must be (inputs, targets) or a dict with 'input' and 'target', "
                         f"got {type(batch).__name__}{length}")
    x, y = batch
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not isinstance(y, torch.Tensor) or y.dtype not in _INDEX_DTYPES:
        found = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"targets must be a tensor of class indices (an integer dtype), got {found}")
    return inputs, y.long()


def check_loaders(train_loader: Iterable, val_loader: Iterable | None) -> int:
    """The number of training batches per epoch. :class:`InputError` when the training loader has no length or
    no batch, or the validation loader has a length of 0 (a validation loader without a length that yields
    nothing is refused by the first evaluation)."""
    try:
        steps = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise InputError("train_loader must have a length (a DataLoader over a map-style dataset)") from None
    if steps == 0:
        raise InputError("train_loader yields no batch (dataset smaller than one batch with drop_last?)")
    if val_loader is not None and hasattr(val_loader, "__len__") and len(val_loader) == 0:  # type: ignore[arg-type]
        raise InputError(EMPTY_VAL)
    return steps

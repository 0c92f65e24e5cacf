"""Re-estimating batch-norm statistics after conversion, with the gates evaluation uses."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ..dlgn import DLGN
from ..utils.modes import preserved_modes
from .batches import split_batch, to_device


@torch.no_grad()
def recalibrate_bn(dlgn: DLGN, loader: Iterable, batches: int, device: torch.device | str | None = None,
                   networks: Sequence[str] = ("gating", "value")) -> int:
    """Re-estimate the batch-norm running statistics of ``networks`` of ``dlgn`` as the plain average over
    ``batches`` training batches, with hard gates — what evaluation uses. Weights are not changed, and every
    module's train/eval flag is as it was afterwards.

    A fresh conversion keeps the source network's statistics, which the gating network (its activations
    removed) no longer produces. Returns the number of batches used.
    """
    norms = [m for net in networks for m in getattr(dlgn, net).modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    device = torch.device(device) if device is not None else dlgn.device
    momenta = [m.momentum for m in norms]
    used = 0
    with preserved_modes(dlgn):
        dlgn.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for batch in loader:
                if used >= batches:
                    break
                inputs, _ = split_batch(batch)
                dlgn.run(*(to_device(x, device) for x in inputs), hard=True)
                used += 1
        finally:
            for m, mom in zip(norms, momenta):
                m.momentum = mom
    return used

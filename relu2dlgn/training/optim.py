"""The optimiser (one parameter group per network and decay class) and its learning-rate schedule."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from .config import OptimOptions
from .schedules import lr_factor


def param_groups(networks: dict[str, nn.Module], cfg: OptimOptions) -> list[dict]:
    """Trainable parameters of each network (a DLGN's ``gating`` and ``value``; a classifier's ``model``), each
    split into weights (decayed) and biases/norm parameters (no decay), with each network's own lr and weight
    decay where the options give one (``gating_lr``, ``value_weight_decay``, ...). Groups are named
    ``"gating weights"``, ``"value biases/norms"``, ..."""
    groups = []
    for net, module in networks.items():
        lr = getattr(cfg, f"{net}_lr", None)
        wd = getattr(cfg, f"{net}_weight_decay", None)
        lr = cfg.lr if lr is None else lr
        wd = cfg.weight_decay if wd is None else wd
        params = [p for p in module.parameters() if p.requires_grad]
        for ps, w, kind in (([p for p in params if p.dim() > 1], wd, "weights"),
                            ([p for p in params if p.dim() <= 1], 0.0, "biases/norms")):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": w, "name": f"{net} {kind}"})
    if not groups:
        raise InputError("nothing to train: no trainable parameter (networks frozen or parameter-free)")
    return groups


def make_optimizer(networks: dict[str, nn.Module], cfg: OptimOptions) -> torch.optim.Optimizer:
    """Fused AdamW or Nesterov SGD over :func:`param_groups` (the fused kernels are several times faster than
    the per-parameter loop on CPU; a device or dtype without them falls back to the loop)."""
    groups = param_groups(networks, cfg)
    for fused in (True, None):
        try:
            if cfg.optimizer == "sgd":
                return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=fused)
            return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
        except (RuntimeError, TypeError, ValueError):
            if fused is None:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to 0."""
    warmup = int(warmup_fraction * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr_gating": ..., "lr_value": ...}``: each network's current learning rate."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault("lr_" + g["name"].split()[0], g["lr"])
    return out


def grad_norm(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm of ``params`` (their ``.grad``; 0 without any), clipping the gradients to
    ``max_norm`` when one is given."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

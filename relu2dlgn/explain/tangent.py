"""Per-example gradients of a model's outputs with respect to its parameters (torch.func: vmap over grad /
jacrev), for the tangent kernel (:mod:`.ntk`) and gradient similarity (:mod:`.similarity`).

Whose parameters, and which function:

* a converted model (DLGN or DGN): the **value network's** parameters, with the gates *fixed* — computed once
  from the eval-mode gating network (hard gates) and handed to the value network as constants. The output is
  linear in each layer's weights for fixed gates; the gating network gets no gradient.
* any other ``nn.Module`` (the source network): all its parameters, in eval mode.

``params`` restricts the parameters to those whose names start with one of the given prefixes (names as in
``model.value.named_parameters()`` for a DLGN, ``model.named_parameters()`` otherwise). The features of one
example are the per-parameter gradients flattened and concatenated in ``named_parameters`` order;
``Features.blocks`` names each parameter's slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from tqdm import tqdm

from ..dlgn import DLGN
from ..errors import InputError
from ..utils.modes import eval_mode
from .common import batch_dim, fitting, require_single_input

Reduce = Literal["sum", "jacobian"]


@dataclass
class Features:
    """Per-example gradient features: ``values`` is ``(n, D)`` (``reduce="sum"``: the gradient of the summed
    outputs) or ``(n, C, D)`` (``"jacobian"``: one row per output unit); ``blocks`` is ``[(name, size)]``."""

    values: Tensor
    blocks: list[tuple[str, int]]


def _flat_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out.reshape(-1)
    if isinstance(out, (tuple, list)):
        parts = [_flat_output(o) for o in out if isinstance(o, (Tensor, tuple, list, dict))]
        return torch.cat([p for p in parts if p.is_floating_point()])
    if isinstance(out, dict):
        return _flat_output(list(out.values()))
    raise InputError(f"the model's output is a {type(out).__name__}, not tensors")


@dataclass
class _Setup:
    module: nn.Module
    fn: Callable[..., Tensor]
    args: tuple[Tensor, ...]
    in_dims: tuple[int, ...]


def _setup(model: nn.Module, x: Tensor) -> _Setup:
    if isinstance(model, DLGN):
        require_single_input(model, "per-example gradients")
        x = x.to(model.device)
        model.check_inputs((x,))
        with eval_mode(model), torch.no_grad(), fitting(model, x, "the inputs"):
            gates = model.gates(x, hard=True)
        u = model.value_inputs(x)[0]
        dims = tuple(batch_dim(s) for s in model.gate_specs)
        value = model.value

        def fn(p: dict[str, Tensor], u1: Tensor, *g1: Tensor) -> Tensor:
            gs = [g.unsqueeze(d) for g, d in zip(g1, dims)]
            return _flat_output(functional_call(value, p, (u1.unsqueeze(0), *gs)))

        return _Setup(value, fn, (u, *gates), (0, *dims))
    if not isinstance(model, nn.Module):
        raise InputError(f"expected an nn.Module or a relu2dlgn.DLGN, got {type(model).__name__}")

    def fn_module(p: dict[str, Tensor], x1: Tensor) -> Tensor:
        return _flat_output(functional_call(model, p, (x1.unsqueeze(0),)))

    return _Setup(model, fn_module, (x,), (0,))


def select_params(module: nn.Module, params: Sequence[str] | None) -> dict[str, Tensor]:
    """The named parameters of ``module`` whose names start with one of ``params`` (all when ``None``)."""
    named = [(k, v) for k, v in module.named_parameters() if v.requires_grad or params is not None]
    if params is not None:
        if isinstance(params, str):
            params = [params]
        chosen = [(k, v) for k, v in named if any(k == p or k.startswith(p.rstrip(".") + ".") for p in params)]
        if not chosen:
            names = ", ".join(k for k, _ in named[:8]) + (" ..." if len(named) > 8 else "")
            raise InputError(f"no parameter matches {list(params)}; the parameters are: {names}")
        named = chosen
    if not named:
        raise InputError("the model has no trainable parameters")
    return {k: v.detach() for k, v in named}


def per_example_gradients(model: nn.Module, x: Tensor, *, reduce: Reduce = "sum", params: Sequence[str] | None = None,
                          chunk: int = 128, max_bytes: int = 2 ** 31, progress: bool = False,
                          desc: str = "gradients") -> Features:
    """Per-example gradient features of ``model``'s outputs for the examples ``x`` (see the module docstring).

    ``reduce="sum"``: ``grad_theta sum_k f_k(x)`` per example; ``"jacobian"``: ``grad_theta f_k(x)`` for every
    output unit k. ``chunk`` examples share one vmapped call. Raises :class:`~relu2dlgn.errors.InputError` when
    the features would take more than ``max_bytes`` (pass ``params=`` to restrict them, or fewer examples).
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise InputError(f"expected a non-empty batch of examples, got {getattr(x, 'shape', type(x).__name__)}")
    setup = _setup(model, x)
    p = select_params(setup.module, params)
    blocks = [(k, v.numel()) for k, v in p.items()]
    dim = sum(s for _, s in blocks)
    n = x.shape[0]
    with eval_mode(setup.module), torch.no_grad():
        outputs = setup.fn(p, *(a.select(d, 0) for a, d in zip(setup.args, setup.in_dims))).numel()
    width = outputs if reduce == "jacobian" else 1
    need = n * width * dim * torch.finfo(next(iter(p.values())).dtype).bits // 8
    if need > max_bytes:
        raise InputError(f"per-example gradients of {n} examples x {width} output(s) x {dim} parameters take "
                         f"{need / 2 ** 30:.1f} GiB (limit {max_bytes / 2 ** 30:.1f} GiB); restrict them with "
                         f"params=[...] (names: {', '.join(k for k, _ in blocks[-3:])} ...) or use fewer examples")
    # the other parameters enter as detached constants: no autograd graph is recorded for them
    fixed = {k: v.detach() for k, v in setup.module.named_parameters() if k not in p}

    def f(q: dict[str, Tensor], *a: Tensor) -> Tensor:
        return setup.fn({**fixed, **q}, *a)

    if reduce == "sum":
        per = grad(lambda q, *a: f(q, *a).sum())
    elif reduce == "jacobian":
        per = jacrev(f)
    else:
        raise InputError(f"reduce must be 'sum' or 'jacobian', got {reduce!r}")
    batched = vmap(per, in_dims=(None, *setup.in_dims))
    rows = []
    with eval_mode(setup.module):
        for s in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False):
            k = min(chunk, n - s)
            args = tuple(a.narrow(d, s, k) for a, d in zip(setup.args, setup.in_dims))
            g = batched(p, *args)
            rows.append(torch.cat([g[name].detach().reshape(k, width, -1) for name, _ in blocks], dim=2))
    values = torch.cat(rows)
    return Features(values[:, 0] if reduce == "sum" else values, blocks)

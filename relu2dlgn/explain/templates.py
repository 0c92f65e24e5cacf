"""Gate templates: the exact input-space map of each pre-activation of a DLGN's gating network.

In eval mode a DLGN's gating network is affine (every activation removed, max-pool replaced by average
pooling, batch norm a fixed affine map), so the pre-activation of unit ``u`` at a site is exactly

    q_u(x) = <w_u, x> + b_u,    b_u = q_u(0),    w_u = d q_u / d x

— one backward pass per unit, no sampling. For a convolutional site, unit ``u`` is channel ``u`` at one
spatial ``position`` (default: the centre of the site's map); the template of the same channel at another
position is this one shifted (up to border effects), so one map per channel describes the site. A site of
shape ``(N, F)`` (after a linear layer) has one template per feature.

A DGN's gating network is the source network itself: its templates depend on the input. They are refused
unless ``at`` (one example) is given; then the *local* affine map at ``at`` is returned
(``w = d q / d x`` at ``at``, ``b = q(at) - <w, at>``, exact only on the linear region of ``at``) and
``Templates.local`` is True. The same holds for a DLGN converted with ``strict=False`` that kept
nonlinearities.

Example::

    T = explain.gate_templates(dlgn, site=3)          # one template per channel of site 3
    T.weights.shape                                   # (channels, *input shape)
    torch.allclose(T.apply(x), dlgn.pre_activations(x)[3][:, T.units, 4, 4])   # position (4, 4)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ExplainError, InputError, OptionError
from ..sites import GateSite
from ..utils.modes import eval_mode
from .common import check_site, require_dlgn, require_single_input

log = logging.getLogger(__name__)


@dataclass
class Templates:
    """The affine maps ``q_u(x) = <weights[k], x> + bias[k]`` of units ``units[k]`` of one site at ``position``."""

    site: GateSite
    weights: Tensor
    bias: Tensor
    units: Tensor
    position: tuple[int, ...]
    local: bool

    def apply(self, x: Tensor) -> Tensor:
        """``<w, x> + b`` for a batch ``x``: shape (N, units)."""
        return x.flatten(1).to(self.weights.dtype) @ self.weights.flatten(1).T + self.bias

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site.index, "kind": self.site.kind, "node": self.site.node,
                "module_path": self.site.module_path, "position": list(self.position),
                "units": self.units.tolist(), "local": self.local, "bias": self.bias.tolist(),
                "weight_norm": self.weights.flatten(1).norm(dim=1).tolist()}


def is_affine(dlgn: Any) -> bool:
    """True when the gating network is affine in its input in eval mode (a strict DLGN)."""
    return dlgn.mode == "dlgn" and not dlgn.report.nonlinear_kept


def _input_shape(dlgn: Any, at: Tensor | None, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if at is not None:
        return tuple(at.shape[1:])
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    example = dlgn.input_specs[0].example_shape if dlgn.input_specs else None
    if example:
        return tuple(example[1:])
    raise InputError("gate_templates: the model does not record its input shape; pass input_shape=(C, H, W)")


def _position(q: Tensor, position: Sequence[int] | None, site: int) -> tuple[int, ...]:
    spatial = tuple(q.shape[2:])
    if position is None:
        return tuple(s // 2 for s in spatial)
    pos = tuple(int(p) for p in position)
    if len(pos) != len(spatial) or any(not 0 <= p < s for p, s in zip(pos, spatial)):
        raise OptionError(f"gate_templates: position={tuple(position)} does not fit site {site}'s map of spatial "
                          f"shape {spatial}")
    return pos


def gate_templates(dlgn: Any, site: int, *, position: Sequence[int] | None = None, units: Sequence[int] | None = None,
                   at: Tensor | None = None, input_shape: Sequence[int] | None = None,
                   chunk: int = 128) -> Templates:
    """The templates of ``units`` (default: every unit) of gate site ``site`` (see the module docstring).

    ``position``: the spatial position of a convolutional site's pre-activation (default: the centre).
    ``at``: one example ``(1, *input shape)``; required for a DGN (local map), ignored for a DLGN (the map is the
    same everywhere). ``input_shape``: ``(C, H, W)`` when the model does not record it. Runs in eval mode;
    ``chunk`` units share one backward pass.

    Raises :class:`~relu2dlgn.errors.OptionError` for a site, position or unit out of range and
    :class:`~relu2dlgn.errors.ExplainError` for a DGN without ``at`` or a model that is not converted.
    """
    dlgn = require_dlgn(dlgn, "gate_templates")
    require_single_input(dlgn, "gate_templates")
    index = check_site(dlgn, site)
    affine = is_affine(dlgn)
    if not affine and at is None:
        why = "a DGN's gating network is the source network" if dlgn.mode == "dgn" else \
            "this DLGN's gating network keeps nonlinearities (converted with strict=False)"
        raise ExplainError(f"gate_templates: {why}, so its templates depend on the input; pass at=x (one example) "
                           f"for the local affine map at x")
    if at is not None:
        if not isinstance(at, Tensor) or at.dim() < 1 or at.shape[0] != 1:
            raise InputError(f"gate_templates: at must be one example with a batch dimension of 1, got "
                             f"{getattr(at, 'shape', type(at).__name__)}")
        if affine:
            log.debug("gate_templates: the DLGN's gating network is affine; at= is not needed and is ignored")
            at = None
    shape = _input_shape(dlgn, at, input_shape)
    dtype, device = dlgn.dtype, dlgn.device
    origin = torch.zeros((1, *shape), dtype=dtype, device=device) if at is None else at.to(device, dtype)
    with eval_mode(dlgn):
        with torch.no_grad():
            q0 = dlgn.pre_activations(origin)[index]
        pos = _position(q0, position, index)
        n_units = q0.shape[1] if q0.dim() >= 2 else 1
        chosen = torch.arange(n_units) if units is None else torch.as_tensor(list(units), dtype=torch.long)
        if chosen.numel() == 0 or chosen.min() < 0 or chosen.max() >= n_units:
            raise OptionError(f"gate_templates: units must be indices in 0..{n_units - 1} of site {index}, got "
                              f"{list(units) if units is not None else []}")
        weights, values = [], []
        for s in range(0, chosen.numel(), chunk):
            part = chosen[s:s + chunk].to(device)
            k = part.numel()
            x = origin.expand(k, *shape).clone().requires_grad_(True)
            q = dlgn.pre_activations(x)[index]
            picked = q[(torch.arange(k, device=device), part, *pos)] if q.dim() >= 2 else q
            (grad,) = torch.autograd.grad(picked.sum(), x)
            weights.append(grad.detach())
            values.append(picked.detach())
    w = torch.cat(weights)
    value = torch.cat(values)
    bias = value if at is None else value - (w.flatten(1) * origin.flatten(1)).sum(1)
    return Templates(dlgn.sites[index], w, bias, chosen, pos, local=at is not None)

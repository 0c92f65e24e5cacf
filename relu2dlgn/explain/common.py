"""What the instruments share: checking that a model is a converted one, reading batches from a loader with a
clear error for a bad one, and indexing gate tensors along their batch axis.

Gate tensors are batched along dim 0, except hardtanh gates, which stack the two step gates first:
``(2, N, ...)`` (see :mod:`relu2dlgn.gates`); :func:`batch_dim` says which axis is the batch for a site.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..dlgn import DLGN
from ..errors import ExplainError, InputError, OptionError
from ..gates import GateSpec


def require_dlgn(model: Any, what: str) -> DLGN:
    """``model`` itself if it is a converted model (DLGN or DGN), else :class:`ExplainError` naming ``what``."""
    if not isinstance(model, DLGN):
        raise ExplainError(f"{what} needs a converted model (relu2dlgn.DLGN), got {type(model).__name__}; convert "
                           f"it first: dlgn = relu2dlgn.convert(model)")
    return model


def require_single_input(dlgn: DLGN, what: str) -> None:
    if len(dlgn.input_specs) != 1:
        raise ExplainError(f"{what} supports models with one input; this one has {len(dlgn.input_specs)} "
                           f"({', '.join(s.name for s in dlgn.input_specs)})")


def check_site(dlgn: DLGN, site: int) -> int:
    """``site`` as a valid site index (negative counts from the end), else :class:`OptionError`."""
    n = len(dlgn.sites)
    if isinstance(site, bool) or not isinstance(site, int) or not -n <= site < n:
        raise OptionError(f"site={site!r} is out of range: this model has {n} gate sites (0..{n - 1}; see "
                          f"dlgn.sites or `relu2dlgn inspect`)")
    return site % n


def split_batch(batch: Any, index: int) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of one loader batch: ``(x, y)``, ``[x, y]`` or ``x`` alone; :class:`InputError` otherwise."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise InputError(f"batch {index} of the loader is a {type(batch).__name__}; expected a tensor of inputs or "
                     f"an (inputs, labels) pair")


def batches(loader: Iterable, dlgn: DLGN | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The ``(x, y)`` batches of ``loader``, ``x`` moved to the model's device; each checked against ``dlgn``'s
    inputs (rank, dtype) with an :class:`InputError` naming the batch."""
    device = dlgn.device if dlgn is not None else None
    for i, batch in enumerate(loader):
        x, y = split_batch(batch, i)
        if device is not None:
            x = x.to(device)
        if dlgn is not None:
            try:
                dlgn.check_inputs((x,))
            except InputError as exc:
                raise InputError(f"batch {i} of the loader does not fit the model: {exc}") from None
        yield x, y


@contextlib.contextmanager
def fitting(dlgn: DLGN, x: Tensor, where: str) -> Iterator[None]:
    """Turn a shape error of the model's forward pass on ``x`` into an :class:`InputError` naming ``where``, the
    shape and the model's example input shape (a channel count or feature size the first layer cannot take)."""
    try:
        yield
    except RuntimeError as exc:
        example = dlgn.input_specs[0].example_shape if dlgn.input_specs else None
        expected = f" (converted with an example input of shape {tuple(example)})" if example else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{where} of shape {tuple(x.shape)} does not fit the model{expected}: {first}") from None


def take(loader: Iterable, n: int, dlgn: DLGN | None = None) -> tuple[Tensor, Tensor | None]:
    """The first ``n`` examples of ``loader`` (fewer if it has fewer) as one batch, with their labels if any."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    got = 0
    for x, y in batches(loader, dlgn):
        k = min(n - got, x.shape[0])
        xs.append(x[:k])
        if y is not None:
            ys.append(y[:k])
        got += k
        if got >= n:
            break
    if not xs:
        raise InputError("the loader yielded no examples")
    return torch.cat(xs), (torch.cat(ys) if len(ys) == len(xs) else None)


def batch_dim(spec: GateSpec) -> int:
    """The batch axis of a site's gate tensor: 1 for hardtanh (two stacked step gates), else 0."""
    return 1 if spec.kind == "hardtanh" else 0


def select_gates(gates: Sequence[Tensor], specs: Sequence[GateSpec], index: Tensor) -> tuple[Tensor, ...]:
    """The gates of the examples ``index`` (a 1-d index tensor), each along its own batch axis."""
    return tuple(g.index_select(batch_dim(s), index.to(g.device)) for g, s in zip(gates, specs))


def cat_gates(chunks: Sequence[Sequence[Tensor]], specs: Sequence[GateSpec]) -> tuple[Tensor, ...]:
    """Concatenate per-chunk gate tuples along each site's batch axis."""
    return tuple(torch.cat([c[i] for c in chunks], dim=batch_dim(s)) for i, s in enumerate(specs))


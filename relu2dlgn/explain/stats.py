"""Gate statistics: how often each gate site's units fire, streamed over a loader with bounded memory.

Everything is read from the gating network's pre-activations ``q`` (eval mode, hard gates), site by site:

* **on fraction** — the fraction of the site's gate elements that are *on*: ``q > 0`` for relu / leaky_relu /
  prelu (the unit's slope is 1), ``lo < q <= hi`` for hardtanh (the linear piece). Hardtanh sites also report
  the fraction of each piece (``below`` ``q <= lo``, ``linear``, ``above`` ``q > hi``).
* **units** — the unit axis is dim 1 (a conv site's channels, a linear site's features); a unit's *firing
  rate* is its on fraction over the examples and positions seen. *Dead* units never fire (rate 0), *always-on*
  units always do (rate 1).
* **entropy** — the mean over units of the binary entropy ``H(r) = -r log2 r - (1-r) log2 (1-r)`` of the unit's
  firing rate, in bits: 0 when every unit is dead or always on, 1 when every unit fires half of the time.
* **max-pool sites** — the gate is the arg max of each window. ``window`` counts how often each window offset
  (row-major over the kernel, ties to the first maximum as PyTorch's max-pool) is selected; ``evenness`` is the
  entropy of that distribution divided by ``log(K)`` (1: the arg max spreads evenly over the K offsets; 0: it
  is always the same offset). Max-pool sites have no on fraction (``None``).

Memory is O(units + window size) per site whatever the loader's length.

Example::

    stats = explain.gate_stats(dlgn, val_loader)
    stats.on_fraction, stats.sites[3].dead, stats.sites[3].unit_rates   # overall, per site, per unit
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import InputError
from ..gates import GateSpec, pool_windows
from ..utils.modes import eval_mode
from .common import batches, fitting, require_dlgn

log = logging.getLogger(__name__)


@dataclass
class SiteStats:
    """Firing statistics of one gate site (see the module docstring for each field's definition)."""

    index: int
    kind: str
    node: str
    module_path: str
    elements: int
    on_fraction: float | None
    unit_rates: Tensor | None
    dead: int
    always_on: int
    entropy: float | None
    pieces: dict[str, float] | None = None
    window: Tensor | None = None
    evenness: float | None = None

    @property
    def units(self) -> int:
        return 0 if self.unit_rates is None else int(self.unit_rates.numel())

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "node": self.node, "module_path": self.module_path,
                "elements": self.elements, "on_fraction": self.on_fraction, "units": self.units,
                "dead": self.dead, "always_on": self.always_on, "entropy": self.entropy, "pieces": self.pieces,
                "window": None if self.window is None else [int(v) for v in self.window.tolist()],
                "evenness": self.evenness}


@dataclass
class GateStats:
    """Per-site statistics and the totals over the relu-family and hardtanh sites."""

    sites: list[SiteStats]
    examples: int

    @property
    def on_fraction(self) -> float | None:
        """On fraction over every non-max-pool gate element (sites weighted by their element counts)."""
        rated = [s for s in self.sites if s.on_fraction is not None]
        total = sum(s.elements for s in rated)
        return sum(s.on_fraction * s.elements for s in rated) / total if total else None

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.sites)

    @property
    def always_on(self) -> int:
        return sum(s.always_on for s in self.sites)

    @property
    def units(self) -> int:
        return sum(s.units for s in self.sites)

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "on_fraction": self.on_fraction, "units": self.units,
                "dead": self.dead, "always_on": self.always_on, "sites": [s.as_dict() for s in self.sites]}


class _Accumulator:
    """Running sums for one site."""

    def __init__(self, spec: GateSpec):
        self.spec = spec
        self.on: Tensor | None = None      # per unit: count of on elements
        self.seen: Tensor | None = None    # per unit: count of elements
        self.below = 0
        self.above = 0
        self.window: Tensor | None = None

    def add(self, q: Tensor) -> None:
        spec = self.spec
        if spec.kind == "maxpool":
            geo = spec.pool
            assert geo is not None
            offsets = pool_windows(q, geo, float("-inf")).argmax(2)
            k = math.prod(geo.kernel_size)
            counts = torch.bincount(offsets.flatten().cpu(), minlength=k).to(torch.float64)
            self.window = counts if self.window is None else self.window + counts
            return
        if spec.kind == "hardtanh":
            below, above = q <= spec.lo, q > spec.hi
            on = ~below & ~above
            self.below += int(below.sum())
            self.above += int(above.sum())
        else:
            on = q > 0
        units = on.reshape(on.shape[0], on.shape[1], -1) if on.dim() >= 2 else on.reshape(-1, 1, 1)
        count = units.sum((0, 2), dtype=torch.float64).cpu()
        seen = torch.full_like(count, units.shape[0] * units.shape[2])
        self.on = count if self.on is None else self.on + count
        self.seen = seen if self.seen is None else self.seen + seen

    def result(self, site: Any) -> SiteStats:
        base = dict(index=site.index, kind=site.kind, node=site.node, module_path=site.module_path)
        if self.spec.kind == "maxpool":
            w = self.window if self.window is not None else torch.zeros(1, dtype=torch.float64)
            total = float(w.sum())
            p = w / total if total else w
            k = w.numel()
            h = -float((p[p > 0] * p[p > 0].log()).sum()) if total else 0.0
            return SiteStats(**base, elements=int(total), on_fraction=None, unit_rates=None, dead=0, always_on=0,
                             entropy=None, window=w.to(torch.int64), evenness=h / math.log(k) if k > 1 else 1.0)
        assert self.on is not None and self.seen is not None
        rates = self.on / self.seen
        elements = int(self.seen.sum())
        pieces = None
        if self.spec.kind == "hardtanh":
            pieces = {"below": self.below / elements, "linear": float(self.on.sum()) / elements,
                      "above": self.above / elements}
        return SiteStats(**base, elements=elements, on_fraction=float(self.on.sum()) / elements,
                         unit_rates=rates.to(torch.float32), dead=int((rates == 0).sum()),
                         always_on=int((rates == 1).sum()), entropy=float(binary_entropy(rates).mean()),
                         pieces=pieces)


def binary_entropy(p: Tensor) -> Tensor:
    """``-p log2 p - (1-p) log2 (1-p)``, 0 at p = 0 and p = 1."""
    p = p.to(torch.float64)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)


def gate_stats(dlgn: Any, loader: Iterable, *, max_batches: int | None = None, progress: bool = False) -> GateStats:
    """Stream ``loader`` (batches ``x`` or ``(x, y)``) through the gating network and return :class:`GateStats`.

    Runs in eval mode (batch norm with its running statistics) without gradients; the model's flags are
    restored. ``max_batches`` stops early. Raises :class:`~relu2dlgn.errors.ExplainError` for a model that is not
    converted and :class:`~relu2dlgn.errors.InputError` naming the first batch that does not fit the model.
    """
    dlgn = require_dlgn(dlgn, "gate_stats")
    accs = [_Accumulator(spec) for spec in dlgn.gate_specs]
    examples = 0
    with eval_mode(dlgn), torch.no_grad():
        for b, (x, _) in enumerate(tqdm(batches(loader, dlgn), desc="gate stats", disable=not progress,
                                        leave=False)):
            if max_batches is not None and b >= max_batches:
                break
            with fitting(dlgn, x, f"batch {b} of the loader"):
                qs = dlgn.pre_activations(x)
            for acc, q in zip(accs, qs):
                acc.add(q)
            examples += x.shape[0]
    if not examples:
        raise InputError("gate_stats: the loader yielded no examples")
    log.debug("gate statistics over %d examples", examples)
    return GateStats([acc.result(site) for acc, site in zip(accs, dlgn.sites)], examples)

"""Gate agreement: how often a converted model's gates equal its source network's gates, site by site.

The source network's pre-activations come from :class:`~relu2dlgn.training.TeacherTap` (one forward pass of
the source), its sites are matched to the DLGN's by source-graph node name
(:func:`~relu2dlgn.training.match_sites`), and both sides' pre-activations are turned into hard gates with the
same gate function (:func:`relu2dlgn.gates.make_gate`). A gate element *agrees* when

* relu / leaky_relu / prelu: both ``1(q > 0)`` are equal;
* hardtanh: both select the same linear piece (both step gates equal);
* max-pool: both select the same position of the window (the same arg max).

``agreement`` of a site is the fraction of its gate elements that agree; ``overall`` weights the sites by their
element counts. ``predictions`` is the fraction of examples on which both models' outputs have the same arg
max (when the output is an ``(N, classes)`` tensor).

Example::

    agree = explain.gate_agreement(dlgn, source_model, val_loader)
    agree.overall, [s.agreement for s in agree.sites]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import InputError
from ..gates import make_gate
from ..training import TeacherTap, match_sites
from ..utils.modes import eval_mode
from .common import batches, fitting, require_dlgn


@dataclass
class SiteAgreement:
    index: int
    kind: str
    node: str
    module_path: str
    elements: int
    agreement: float

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class GateAgreement:
    sites: list[SiteAgreement]
    examples: int
    predictions: float | None

    @property
    def overall(self) -> float:
        total = sum(s.elements for s in self.sites)
        return sum(s.agreement * s.elements for s in self.sites) / total if total else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "overall": self.overall, "predictions": self.predictions,
                "sites": [s.as_dict() for s in self.sites]}


def _agree(kind: str, a: Tensor, b: Tensor) -> Tensor:
    same = a == b
    return same.all(0) if kind == "hardtanh" else same


def gate_agreement(dlgn: Any, source: nn.Module, loader: Iterable, *, leaf_modules: Iterable[type | str] = (),
                   max_batches: int | None = None, progress: bool = False) -> GateAgreement:
    """Per-site agreement of ``dlgn``'s hard gates with ``source``'s over ``loader`` (eval mode, no gradients).

    ``source`` is the network ``dlgn`` was converted from (same architecture; ``leaf_modules`` as at
    conversion). Raises :class:`~relu2dlgn.errors.InputError` when the sites do not match (naming them) or a
    batch does not fit the model.
    """
    dlgn = require_dlgn(dlgn, "gate_agreement")
    if not isinstance(source, nn.Module):
        raise InputError(f"gate_agreement: source must be the nn.Module the DLGN was converted from, got "
                         f"{type(source).__name__}")
    tap: TeacherTap | None = None
    pairs: list[tuple[int, int]] = []
    agree = [0.0] * len(dlgn.sites)
    seen = [0] * len(dlgn.sites)
    same_pred = 0
    examples = 0
    with eval_mode(dlgn, source), torch.no_grad():
        for b, (x, _) in enumerate(tqdm(batches(loader, dlgn), desc="gate agreement", disable=not progress,
                                        leave=False)):
            if max_batches is not None and b >= max_batches:
                break
            with fitting(dlgn, x, f"batch {b} of the loader"):
                run = dlgn.run(x, hard=True)
                if tap is None:
                    tap = TeacherTap(source, (x[:1],), leaf_modules)
                    pairs = match_sites(dlgn, tap.site_nodes, tap.site_kinds)
                out_s, qs_s = tap(x)
            for i, j in pairs:
                spec = dlgn.gate_specs[i]
                ok = _agree(spec.kind, make_gate(spec, run.pre_activations[i], 1.0, True),
                            make_gate(spec, qs_s[j], 1.0, True))
                agree[i] += float(ok.sum())
                seen[i] += ok.numel()
            if isinstance(out_s, Tensor) and isinstance(run.output, Tensor) and out_s.dim() == 2:
                same_pred += int((out_s.argmax(1) == run.output.argmax(1)).sum())
            examples += x.shape[0]
    if not examples:
        raise InputError("gate_agreement: the loader yielded no examples")
    sites = [SiteAgreement(s.index, s.kind, s.node, s.module_path, seen[s.index],
                           agree[s.index] / seen[s.index] if seen[s.index] else float("nan")) for s in dlgn.sites]
    predictions = same_pred / examples if isinstance(run.output, Tensor) and run.output.dim() == 2 else None
    return GateAgreement(sites, examples, predictions)

"""``shuffle_gates``: what happens when the gate masks are shuffled — across examples, or across layers?

Claim (arXiv 2203.16455): "the gating masks can be shuffled without any significant loss in performance": the
NPK of a fully connected net is ``<x, x'> prod_l overlap_l(x, x')``, a product over layers, so it does not
change when the layers' masks are permuted among same-shaped layers, and a value network trained on permuted
masks does as well. (The brief of this tool adds: for the DLGN, shuffling layers hurts little; for the
source-like DGN it does.)

Protocol, for two models — the learnt **DLGN** (a run directory's fine-tuned ``model/``, or the source
converted and fine-tuned here with distillation, first seed) and the **DGN** of the trained source
(``convert(source, mode="dgn")``, which computes exactly the source network) — all on the validation set with
hard gates:

1. **no shuffle** — the model as it is;
2. **one site shuffled across examples** — at site ``i`` alone, each validation batch's gate masks are permuted
   among its examples (example ``j`` gets the masks of example ``pi(j)``; the value network still sees ``x_j``),
   every site in turn; seeds: the permutations;
3. **chosen sites shuffled across examples** — the same at every site of ``shuffle_sites`` (default: all),
   an independent permutation per site;
4. **layers permuted (evaluated)** — sites are grouped by gate kind and pre-activation shape; within each group
   of two or more, site ``i`` receives the masks of site ``perm(i)``, ``perm`` a random derangement per seed
   (a swap for a pair); no retraining;
5. **layers permuted, value net retrained** — as 4, with the value network re-initialised and trained from
   scratch on the permuted, frozen gates (``epochs``, seeds) — the papers' protocol;
6. **unpermuted, value net retrained** — the same training on the unpermuted gates (``fixed_gates``' rows).

Verdict: the papers' claim holds when (5) is at most 2 points (or twice the pooled std) below (6) for the DLGN.
A model with no two same-shaped gate sites has no layer permutation: rows 4–6 are left out and the verdict is
"n/a".
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ..dlgn import DLGN
from ..errors import OptionError
from ..explain.common import batch_dim
from ..gates import GateSpec
from ..training.losses import select_logits
from ..utils.modes import eval_mode
from .common import EXPLICITISING, base_protocol, finish, open_setup, run_row, within
from .config import ExperimentConfig, site_list
from .figures import site_chart
from .result import ExperimentResult, Row
from .runs import gating_of, learnt_dlgn, value_on_gates
from .setup import Setup

NAME = "shuffle_gates"
CLAIM = ("the gating masks can be shuffled across layers without significant loss (the NPK is a product over "
         "layers, invariant to their order); masks shuffled across examples carry no information")
GateTransform = Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]


# -- the mechanics -------------------------------------------------------------------------------------
def shuffle_examples(gates: Sequence[Tensor], specs: Sequence[GateSpec], sites: Iterable[int],
                     generator: torch.Generator) -> tuple[Tensor, ...]:
    """``gates`` with, at each of ``sites``, the examples' masks permuted along the site's batch axis (an
    independent random permutation per site, drawn from ``generator``); the other sites are returned as they
    are (the same tensors)."""
    out = list(gates)
    for i in sites:
        d = batch_dim(specs[i])
        perm = torch.randperm(gates[i].shape[d], generator=generator).to(gates[i].device)
        out[i] = gates[i].index_select(d, perm)
    return tuple(out)


def same_shape_groups(dlgn: DLGN, x: Tensor) -> list[list[int]]:
    """Groups (two or more sites, in site order) of gate sites with the same gate spec (kind, bounds, pool
    geometry) and the same pre-activation shape on ``x``: their masks are interchangeable."""
    with eval_mode(dlgn), torch.no_grad():
        qs = dlgn.pre_activations(x[:2].to(dlgn.device))
    groups: dict[Any, list[int]] = {}
    for i, (spec, q) in enumerate(zip(dlgn.gate_specs, qs)):
        groups.setdefault((spec, tuple(q.shape[1:])), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def layer_permutation(n_sites: int, groups: Sequence[Sequence[int]], generator: torch.Generator) -> list[int]:
    """``perm`` with ``perm[i]`` the site whose masks site ``i`` receives: within each group a random
    derangement (no site keeps its own masks), the identity outside the groups."""
    perm = list(range(n_sites))
    for group in groups:
        while True:
            order = torch.randperm(len(group), generator=generator).tolist()
            if all(o != k for k, o in enumerate(order)):
                break
        for k, o in enumerate(order):
            perm[group[k]] = group[o]
    return perm


def permute_layers(dlgn: DLGN, perm: Sequence[int]) -> DLGN:
    """A copy of ``dlgn`` whose gating network hands site ``i`` the pre-activation of site ``perm[i]`` (so the
    value network applies, at site ``i``, the gates of site ``perm[i]``). Sites exchanged must have the same gate
    spec (:func:`same_shape_groups`); :class:`OptionError` otherwise."""
    specs = dlgn.gate_specs
    if sorted(perm) != list(range(len(specs))):
        raise OptionError(f"permute_layers: {list(perm)} is not a permutation of the {len(specs)} gate sites")
    bad = [(i, p) for i, p in enumerate(perm) if specs[i] != specs[p]]
    if bad:
        raise OptionError(f"permute_layers: sites {bad[:3]} have different gate specs and cannot exchange masks")
    model = copy.deepcopy(dlgn)
    output = next(n for n in reversed(model.gating.graph.nodes) if n.op == "output")
    outs = output.args[0]
    output.args = (tuple(outs[p] for p in perm),)
    model.gating.recompile()
    return model


@torch.no_grad()
def gate_accuracy(dlgn: DLGN, loader: Iterable, transform: GateTransform | None = None) -> float:
    """Validation accuracy of ``dlgn`` with hard gates, each batch's gates passed through ``transform`` first."""
    correct = total = 0
    with eval_mode(dlgn):
        for x, y in loader:
            x, y = x.to(dlgn.device), y.to(dlgn.device)
            gates = dlgn.gates(x, hard=True)
            if transform is not None:
                gates = transform(gates)
            logits = select_logits(dlgn.value_forward((x,), gates))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)


# -- the experiment ------------------------------------------------------------------------------------
def _model_rows(setup: Setup, label: str, key: str, model: DLGN, chosen: list[int]) -> dict[str, Any]:
    seeds = setup.cfg.seed_list()
    model = model.to(setup.device).eval()
    specs = model.gate_specs
    loader = setup.val_loader

    def shuffled(sites: list[int], seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        return gate_accuracy(model, loader, lambda gates: shuffle_examples(gates, specs, sites, g))

    plain = gate_accuracy(model, loader)
    sites = tqdm(list(enumerate(model.sites)), desc=f"shuffle {label} sites", leave=False,
                 disable=not setup.cfg.training.runtime.progress)
    per_site = [Row(f"{i} {site.kind[:4]}", [shuffled([i], s) for s in seeds], note=site.module_path)
                for i, site in sites]
    rows = [Row(f"{label}: no shuffle", [plain], note="hard gates"),
            Row(f"{label}: one site shuffled across examples (mean over sites)", [r.mean for r in per_site],
                note=f"each of the {len(per_site)} sites in turn; n = sites"),
            Row(f"{label}: sites {_sites_text(chosen, len(specs))} shuffled across examples",
                [shuffled(chosen, s) for s in seeds], note="an independent permutation per site and batch")]
    groups = same_shape_groups(model, setup.example[0])
    out: dict[str, Any] = {"rows": rows, "per_site": per_site, "groups": groups}
    if groups:
        perms = {s: layer_permutation(len(specs), groups, torch.Generator().manual_seed(s)) for s in seeds}
        permuted = {s: permute_layers(model, perms[s]) for s in seeds}
        evaluated = Row(f"{label}: layers permuted (evaluated)", [gate_accuracy(permuted[s], loader) for s in seeds],
                        note=f"groups {groups}; a derangement per seed, no retraining")
        retrained = run_row(f"{label}: layers permuted, value net retrained",
                            [value_on_gates(setup, (key, "permuted", tuple(perms[s])), permuted[s], s) for s in seeds],
                            note="frozen permuted gates, value net from scratch")
        unpermuted = run_row(f"{label}: unpermuted, value net retrained",
                             [value_on_gates(setup, ("learnt", key), model, s) for s in seeds],
                             note="= fixed_gates' row")
        rows += [evaluated, retrained, unpermuted]
        out.update(permutations={str(s): p for s, p in perms.items()}, retrained=retrained, unpermuted=unpermuted,
                   evaluated=evaluated)
    out["plain"] = rows[0]
    return out


def _drop(rows: dict[str, Any]) -> float:
    """Points of accuracy the layer permutation costs without retraining."""
    return 100 * (rows["plain"].mean - rows["evaluated"].mean)


def _sites_text(sites: list[int], n: int) -> str:
    return "all" if sorted(sites) == list(range(n)) else ",".join(str(i) for i in sites)


def shuffle_gates(model: str | None = None, *, config: ExperimentConfig | None = None, setup: Setup | None = None,
                  **options: Any) -> ExperimentResult:
    """Run the experiment (see the module docstring); arguments as
    :func:`~relu2dlgn.experiments.fixed_gates`."""
    setup = open_setup(NAME, model, config, setup, options)
    started = time.perf_counter()
    learnt, where = learnt_dlgn(setup)
    dgn = gating_of(setup, "learnt", "dgn")
    n = len(learnt.sites)
    chosen = site_list(setup.cfg.shuffle_sites) if setup.cfg.shuffle_sites else list(range(n))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise OptionError(f"option shuffle_sites={setup.cfg.shuffle_sites!r}: sites {bad} do not exist (the model "
                          f"has {n} gate sites, 0..{n - 1})")
    results = {"DLGN": _model_rows(setup, "DLGN", "dlgn", learnt, chosen),
               "DGN": _model_rows(setup, "DGN", "dgn", dgn, chosen)}
    rows = results["DLGN"]["rows"] + results["DGN"]["rows"]
    d, g = results["DLGN"], results["DGN"]
    if "retrained" in d:
        agrees: bool | None = within(d["retrained"], d["unpermuted"])
        headline = (f"DLGN, layers permuted + value retrained: {d['retrained'].formatted()} vs unpermuted "
                    f"{d['unpermuted'].formatted()}; evaluated without retraining the permutation costs the DLGN "
                    f"{_drop(d):.1f} points and the DGN {_drop(g):.1f}")
        verdict = ("agrees" if agrees else "disagrees") + \
            f": retrained on permuted masks the DLGN loses {100 * (d['unpermuted'].mean - d['retrained'].mean):.2f} " \
            f"points (criterion <= max(2 points, 2 pooled std))"
    else:
        agrees, headline = None, "no two gate sites of the same kind and shape: no layer permutation"
        verdict = "n/a (no layer permutation possible on this model)"
    headline += (f"; all sites shuffled across examples: DLGN {d['rows'][2].formatted()}, "
                 f"DGN {g['rows'][2].formatted()}")
    protocol = {**base_protocol(setup),
                "models": f"DLGN = {where}; DGN = convert(source, mode='dgn') (computes exactly the source)",
                "shuffles": "across examples: within each validation batch; layers: within groups of same kind "
                            "and shape (a derangement per seed)",
                "seeds": f"{setup.cfg.seeds}: the permutations (and the retrained value nets' inits)"}
    result = ExperimentResult(
        NAME, CLAIM, EXPLICITISING, protocol, rows, headline=headline,
        paper="the gating masks can be shuffled without any significant loss (stated; no number quoted here)",
        verdict=verdict, agrees=agrees, out=setup.out,
        details={m: {"per_site": [r.as_dict() for r in res["per_site"]], "groups": res["groups"],
                     "permutations": res.get("permutations")} for m, res in results.items()})
    result.figure = site_chart({m: res["per_site"] for m, res in results.items()},
                               {m: [_short(r) for r in res["rows"] if "mean over sites" not in r.name]
                                for m, res in results.items()},
                               os.path.join(setup.out, f"{NAME}.png"), "Shuffled gate masks (hard gates)")
    return finish(setup, result, started)


def _short(row: Row) -> Row:
    return Row(row.name.split(": ", 1)[-1], row.values, unit=row.unit)

"""``explain.report``: every instrument on one model and one loader, written as PNGs, ``report.json`` (the
numbers) and ``report.md`` (the figures with their numbers).

Files under ``out``:

* ``gates.png`` — gate-on fraction per site (and agreement with the source network's gates);
* ``npk.png`` — the cosine-normalised neural path kernel of the first ``npk_examples`` examples, sorted by class;
* ``templates_site{i}.png`` — the templates of a few sites (default: the first, middle and last non-max-pool
  sites; a DGN's are local maps at the first example);
* ``similarity.png`` — gradient similarity of same-class vs different-class pairs (DLGN, and source);
* ``report.json``, ``report.md``.

Gradient features are taken w.r.t. the *last* parameter tensors of the value network that fit in
``similarity_dims`` coordinates together (named in the report), unless ``similarity_params`` names them: the
full gradient of a ResNet is millions of coordinates per example.

Example::

    r = explain.report(dlgn, val_loader, out="report/", source=model)
    r.numbers["npk"]["alignment"], r.figures["npk"]
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from tqdm import tqdm

from ..errors import OptionError
from ..options import at_least, option
from ..utils.fs import atomic_write_text
from . import plots
from .agreement import GateAgreement, gate_agreement
from .common import check_site, require_dlgn, take
from .npk import cosine_normalize, kernel_alignment, npk
from .similarity import METRICS, Metric, Similarity, similarity_by_metric
from .stats import GateStats, gate_stats
from .templates import gate_templates, is_affine

log = logging.getLogger(__name__)


@dataclass
class ReportOptions:
    """The options of :func:`report` that a command line or config file sets (same names and defaults)."""

    npk_examples: int = option(64, "examples in the neural path kernel (0: skip)", check=at_least(0))
    similarity_examples: int = option(160, "examples for gradient similarity (0: skip)", check=at_least(0))
    metric: Metric = option("block", "similarity metric drawn in the histograms (all are in report.json)")
    similarity_dims: int = option(250_000, "gradient coordinates per example (the last parameter tensors that fit)",
                                  check=at_least(1))
    max_batches: int | None = option(None, "read at most this many batches for the gate statistics and agreement",
                                     check=at_least(1))


@dataclass
class ExplainReport:
    """Where the report went, its numbers (``report.json``) and its figures (name -> file)."""

    out: str
    numbers: dict[str, Any]
    figures: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        n = self.numbers
        lines = [f"report: {os.path.join(self.out, 'report.md')}",
                 f"  gates: on fraction {_fmt(n['gate_stats']['on_fraction'])}, dead units "
                 f"{n['gate_stats']['dead']}/{n['gate_stats']['units']}"]
        if n.get("agreement"):
            lines.append(f"  agreement with the source's gates: {_fmt(n['agreement']['overall'])}")
        if n.get("npk"):
            lines.append(f"  NPK of {n['npk']['examples']} examples: alignment {_fmt(n['npk']['alignment'])} "
                         f"(cosine-normalised {_fmt(n['npk']['alignment_cosine'])})")
        for name, per in n.get("similarity", {}).items():
            s = per[n["similarity_metric"]]
            lines.append(f"  {name} {n['similarity_metric']} gradient similarity: gap {_fmt(s['gap'])}, "
                         f"NCM accuracy {_fmt(s['ncm_accuracy'])} (model {_fmt(s['model_accuracy'])})")
        lines.append(f"  {len(self.figures)} figures, {n['seconds']:.1f} s")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def params_in_order(module: nn.Module) -> list[tuple[str, int]]:
    """``(name, size)`` of ``module``'s parameters in execution order: the order of first use in a graph
    module's graph (its parameters are registered alphabetically), definition order otherwise."""
    named = dict(module.named_parameters())
    if not isinstance(module, fx.GraphModule):
        return [(k, v.numel()) for k, v in named.items()]
    order: list[str] = []
    for node in module.graph.nodes:
        if node.op == "call_module":
            order += [f"{node.target}.{k}" for k, _ in module.get_submodule(node.target).named_parameters()]
        elif node.op == "get_attr":
            order.append(node.target)
    seen = list(dict.fromkeys(k for k in order if k in named))
    return [(k, named[k].numel()) for k in seen + [k for k in named if k not in seen]]


def trailing_params(module: nn.Module, budget: int) -> list[str]:
    """The last parameter tensors of ``module`` in execution order (:func:`params_in_order`) that fit in
    ``budget`` coordinates together (at least the last one)."""
    chosen: list[str] = []
    total = 0
    for name, size in reversed(params_in_order(module)):
        if chosen and total + size > budget:
            break
        chosen.append(name)
        total += size
    return chosen[::-1]


def default_template_sites(dlgn: Any) -> list[int]:
    """The first, middle and last sites that are not max-pool sites (a max-pool site's pre-activation is the
    tensor of the site before it)."""
    candidates = [s.index for s in dlgn.sites if s.kind != "maxpool"] or [s.index for s in dlgn.sites]
    picks = [candidates[0], candidates[len(candidates) // 2], candidates[-1]]
    return sorted(set(picks))


def report(dlgn: Any, loader: Iterable, out: str | os.PathLike, *, source: nn.Module | None = None,
           npk_examples: int = 64, similarity_examples: int = 160, metric: Metric = "block",
           template_sites: Sequence[int] | None = None, template_units: int = 16,
           similarity_params: Sequence[str] | None = None, similarity_dims: int = 250_000,
           max_batches: int | None = None, leaf_modules: Iterable[type | str] = (),
           progress: bool = True) -> ExplainReport:
    """Run the instruments on ``dlgn`` over ``loader`` and write the report to ``out`` (see the module docstring).

    ``source``: the network ``dlgn`` was converted from, for gate agreement and its own gradient similarity.
    ``npk_examples`` / ``similarity_examples``: how many of the loader's first examples the kernel and the
    similarity use (0 skips them). ``metric``: the similarity drawn (all three are in ``report.json``).
    ``template_sites``: site indices (default: see :func:`default_template_sites`).
    """
    dlgn = require_dlgn(dlgn, "report")
    if metric not in METRICS:
        raise OptionError(f"report: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    sites = [check_site(dlgn, s) for s in template_sites] if template_sites is not None else \
        default_template_sites(dlgn)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    numbers: dict[str, Any] = {"model": {"mode": dlgn.mode, "value_input": dlgn.value_input, "pool": dlgn.pool,
                                         "sites": len(dlgn.sites), "source": dlgn.report.source}}
    figures: dict[str, str] = {}
    timings: dict[str, float] = {}
    steps = ["gate statistics", "gate agreement", "examples", "neural path kernel", "templates",
             "gradient similarity"]
    bar = tqdm(total=len(steps), desc="explain", disable=not progress)

    def step(name: str) -> None:
        bar.set_description(f"explain: {name}")
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - timings[name], 3)
        bar.update(1)

    step("gate statistics")
    stats = gate_stats(dlgn, loader, max_batches=max_batches, progress=progress)
    numbers["gate_stats"] = stats.as_dict()
    done("gate statistics")

    step("gate agreement")
    agreement: GateAgreement | None = None
    if source is not None:
        agreement = gate_agreement(dlgn, source, loader, leaf_modules=leaf_modules, max_batches=max_batches,
                                   progress=progress)
        numbers["agreement"] = agreement.as_dict()
    figures["gates"] = plots.gate_bars(stats, os.path.join(out, "gates.png"), agreement)
    done("gate agreement")

    step("examples")
    x, y = take(loader, max(npk_examples, similarity_examples, 1), dlgn)
    numbers["examples"] = int(x.shape[0])
    done("examples")

    step("neural path kernel")
    if npk_examples > 1:
        _npk_section(dlgn, x[:npk_examples], None if y is None else y[:npk_examples], out, numbers, figures,
                     progress)
    done("neural path kernel")

    step("templates")
    _templates_section(dlgn, sites, x, template_units, out, numbers, figures)
    done("templates")

    step("gradient similarity")
    if similarity_examples > 1 and y is not None:
        params = list(similarity_params) if similarity_params is not None else \
            trailing_params(dlgn.value, similarity_dims)
        models = {"DLGN": dlgn} if source is None else {"DLGN": dlgn, "source": source}
        _similarity_section(models, x[:similarity_examples], y[:similarity_examples], params, metric, out, numbers,
                            figures, progress)
    done("gradient similarity")
    bar.close()

    numbers["timings"] = timings
    numbers["seconds"] = round(time.perf_counter() - start, 3)
    numbers["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(numbers, indent=2, default=_json) + "\n")
    atomic_write_text(os.path.join(out, "report.md"), _markdown(numbers, stats, agreement))
    log.info("explain: report written to %s (%.1f s)", out, numbers["seconds"])
    return ExplainReport(out, numbers, figures)


def _npk_section(dlgn: Any, x: torch.Tensor, y: torch.Tensor | None, out: str, numbers: dict[str, Any],
                 figures: dict[str, str], progress: bool) -> None:
    """The NPK of ``x``: its numbers and heat map."""
    K = npk(dlgn, x, progress=progress)
    numbers["npk"] = _npk_numbers(K, y)
    labels = y if y is not None else torch.zeros(x.shape[0], dtype=torch.long)
    figures["npk"] = plots.kernel_heatmap(
        K, labels, os.path.join(out, "npk.png"),
        f"Neural path kernel, {x.shape[0]} examples sorted by class\n(cosine-normalised; alignment "
        f"{_fmt(numbers['npk']['alignment_cosine'])})")


def _templates_section(dlgn: Any, sites: Sequence[int], x: torch.Tensor, units: int, out: str,
                       numbers: dict[str, Any], figures: dict[str, str]) -> None:
    """Gate templates of ``sites`` (at ``x[:1]`` where the gating network is not affine): numbers and grids."""
    numbers["templates"] = []
    for s in sites:
        T = gate_templates(dlgn, s, units=range(min(units, _units(dlgn, s, x))), at=None if is_affine(dlgn) else x[:1])
        numbers["templates"].append(T.as_dict())
        figures[f"templates_site{s}"] = plots.template_grid(T, os.path.join(out, f"templates_site{s}.png"), units)


def _similarity_section(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, params: list[str],
                        metric: Metric, out: str, numbers: dict[str, Any], figures: dict[str, str],
                        progress: bool) -> None:
    """Gradient similarity of each model (every metric in the numbers; ``metric`` drawn)."""
    numbers["similarity_params"] = params
    numbers["similarity_metric"] = metric
    drawn: dict[str, Similarity] = {}
    numbers["similarity"] = {}
    for name, model in models.items():
        per = similarity_by_metric(model, x, y, params=params, progress=progress)
        drawn[name] = per[metric]
        numbers["similarity"][name] = {m: sim.as_dict() for m, sim in per.items()}
    figures["similarity"] = plots.similarity_histograms(drawn, os.path.join(out, "similarity.png"))


def _units(dlgn: Any, site: int, x: torch.Tensor) -> int:
    shape = dlgn.sites[site].shape
    return int(shape[1]) if shape is not None and len(shape) >= 2 else 1 << 30


def _json(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _npk_numbers(K: torch.Tensor, y: torch.Tensor | None) -> dict[str, Any]:
    Kn = cosine_normalize(K)
    off = ~torch.eye(K.shape[0], dtype=torch.bool, device=K.device)
    d: dict[str, Any] = {"examples": int(K.shape[0]), "diagonal_min": float(K.diagonal().min()),
                         "diagonal_max": float(K.diagonal().max()),
                         "min_eigenvalue_cosine": float(torch.linalg.eigvalsh(Kn).min()),
                         "alignment": None, "alignment_cosine": None}
    if y is not None:
        y = y.to(K.device)
        same = (y[:, None] == y[None, :]) & off
        diff = (y[:, None] != y[None, :])
        d.update(alignment=kernel_alignment(K, y), alignment_cosine=kernel_alignment(Kn, y),
                 same_class_cosine=float(Kn[same].mean()) if same.any() else None,
                 different_class_cosine=float(Kn[diff].mean()) if diff.any() else None)
    return d


def _markdown(n: dict[str, Any], stats: GateStats, agreement: GateAgreement | None) -> str:
    f = n["figures"]
    m = n["model"]
    lines = [f"# Reading a {m['mode'].upper()} converted from {m['source']}", "",
             f"{m['sites']} gate sites, value input `{m['value_input']}`, max-pool `{m['pool']}`; "
             f"{stats.examples} examples for the gate statistics, {n['examples']} for the kernel and similarity; "
             f"{n['seconds']:.1f} s.", "",
             "## Gates", "", f"![gate-on fraction per site]({f['gates']})", "",
             f"Overall gate-on fraction **{_fmt(stats.on_fraction)}**; dead units {stats.dead} and always-on units "
             f"{stats.always_on} of {stats.units}."
             + (f" Agreement with the source network's gates **{_fmt(agreement.overall)}**, same prediction on "
                f"{_fmt(agreement.predictions)} of the examples." if agreement is not None else ""), "",
             "| site | kind | module | on fraction | dead / units | entropy (bits) | max-pool evenness |"
             + (" agreement |" if agreement else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if agreement else "")]
    for i, s in enumerate(stats.sites):
        units = f"{s.dead} / {s.units}" if s.unit_rates is not None else "n/a"
        row = f"| {s.index} | {s.kind} | `{s.module_path or s.node}` | {_fmt(s.on_fraction)} | {units} " \
              f"| {_fmt(s.entropy)} | {_fmt(s.evenness)} |"
        if agreement is not None:
            row += f" {_fmt(agreement.sites[i].agreement)} |"
        lines.append(row)
    if "npk" in n:
        k = n["npk"]
        lines += ["", "## Neural path kernel", "", f"![NPK heat map]({f['npk']})", "",
                  f"{k['examples']} examples sorted by class, cosine-normalised. Alignment with the labels "
                  f"{_fmt(k['alignment'])} (cosine-normalised {_fmt(k['alignment_cosine'])}); mean cosine "
                  f"same class {_fmt(k.get('same_class_cosine'))}, different class "
                  f"{_fmt(k.get('different_class_cosine'))}; smallest eigenvalue of the normalised kernel "
                  f"{_fmt(k['min_eigenvalue_cosine'])}; diagonal from {k['diagonal_min']:.3g} to "
                  f"{k['diagonal_max']:.3g}."]
    lines += ["", "## Gate templates", ""]
    for t in n["templates"]:
        kind = "local affine maps at the first example" if t["local"] else "exact templates"
        lines += [f"Site {t['site']} ({t['kind']}, `{t['module_path'] or t['node']}`), {kind} at position "
                  f"{tuple(t['position'])}, units {t['units'][0]}..{t['units'][-1]}:", "",
                  f"![templates of site {t['site']}]({f['templates_site' + str(t['site'])]})", ""]
    if "similarity" in n:
        lines += ["## Gradient similarity", "", f"![similarity histograms]({f['similarity']})", "",
                  f"Features: gradients of the summed logits w.r.t. {len(n['similarity_params'])} parameter "
                  f"tensors (`{n['similarity_params'][0]}` ... `{n['similarity_params'][-1]}`); evaluation split "
                  f"of the {n['examples']} examples.", "",
                  "| model | metric | gap | same-class mean | different-class mean | NCM accuracy | model accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for name, per in n["similarity"].items():
            for metric, s in per.items():
                lines.append(f"| {name} | {metric} | {_fmt(s['gap'])} | {_fmt(s['same_mean'])} | "
                             f"{_fmt(s['different_mean'])} | {_fmt(s['ncm_accuracy'])} | {_fmt(s['model_accuracy'])} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in n["timings"].items()), ""]
    return "\n".join(lines)

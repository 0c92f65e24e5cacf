"""Pictures of the instruments, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend change, safe in threads and on machines without a display). Each function writes one PNG and returns
its path.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from torch import Tensor

from .agreement import GateAgreement
from .npk import cosine_normalize
from .similarity import Similarity
from .stats import GateStats
from .templates import Templates

DPI = 110


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure (imported here, so that importing relu2dlgn.explain does not import matplotlib)."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def gate_bars(stats: GateStats, path: str | os.PathLike, agreement: GateAgreement | None = None) -> str:
    """Bar chart: the gate-on fraction of every site (max-pool sites: the evenness of their arg max), and the
    agreement with the source network's gates when ``agreement`` is given."""
    sites = stats.sites
    width = max(6.0, 0.32 * len(sites) + 2)
    fig = _figure(figsize=(width, 3.6))
    ax = fig.add_subplot()
    xs = list(range(len(sites)))
    step = 0.4 if agreement is not None else 0.8
    on = [s.on_fraction if s.on_fraction is not None else 0.0 for s in sites]
    colors = ["tab:blue" if s.on_fraction is not None else "tab:gray" for s in sites]
    ax.bar([x - (step / 2 if agreement is not None else 0) for x in xs], on, step, color=colors, label="gate on")
    pooled = [(x, s.evenness) for x, s in zip(xs, sites) if s.evenness is not None]
    if pooled:
        ax.bar([x - (step / 2 if agreement is not None else 0) for x, _ in pooled], [e for _, e in pooled], step,
               color="tab:gray",
               label="max-pool: arg-max evenness")
    if agreement is not None:
        ax.bar([x + step / 2 for x in xs], [a.agreement for a in agreement.sites], step, color="tab:orange",
               label="agreement with source")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{s.index}\n{s.kind[:4]}" for s in sites], fontsize=7)
    ax.set_ylim(0, 1.25)
    ax.set_xlabel("gate site")
    ax.set_ylabel("fraction")
    title = f"Gate-on fraction per site ({stats.examples} examples; overall {stats.on_fraction:.2f})" \
        if stats.on_fraction is not None else f"Gate statistics per site ({stats.examples} examples)"
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", ncols=3)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def kernel_heatmap(K: Tensor, labels: Tensor, path: str | os.PathLike, title: str = "Neural path kernel") -> str:
    """Heat map of the cosine-normalised kernel ``K / sqrt(diag diag^T)`` with the examples sorted by class;
    lines separate the classes."""
    order = torch.argsort(labels.cpu(), stable=True)
    Kn = cosine_normalize(K.cpu())[order][:, order]
    y = labels.cpu()[order]
    fig = _figure(figsize=(5.6, 4.8))
    ax = fig.add_subplot()
    off = Kn[~torch.eye(len(y), dtype=torch.bool)]
    vmax = float(off.abs().max()) if off.numel() else 1.0
    im = ax.imshow(Kn.numpy(), cmap="viridis", vmin=min(0.0, float(off.min()) if off.numel() else 0.0),
                   vmax=vmax or 1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine-normalised K (diagonal = 1, off scale)")
    bounds = [i for i in range(1, len(y)) if y[i] != y[i - 1]]
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=0.6)
        ax.axvline(b - 0.5, color="white", lw=0.6)
    starts = [0] + bounds
    ends = bounds + [len(y)]
    centres = [(s + e - 1) / 2 for s, e in zip(starts, ends)]
    ax.set_xticks(centres)
    ax.set_xticklabels([str(int(y[s])) for s in starts], fontsize=7)
    ax.set_yticks(centres)
    ax.set_yticklabels([str(int(y[s])) for s in starts], fontsize=7)
    ax.set_xlabel("examples sorted by class")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _image(w: Tensor) -> Tensor:
    """A 2-d picture of one template: the sum over input channels of a (C, H, W) map, a square (or a strip)
    for a flat input."""
    if w.dim() == 3:
        return w.sum(0)
    if w.dim() == 2:
        return w
    flat = w.reshape(-1)
    side = int(math.isqrt(flat.numel()))
    return flat.reshape(side, side) if side * side == flat.numel() else flat.reshape(1, -1)


def _support(images: list[Tensor]) -> tuple[slice, slice]:
    """Rows and columns where any of the images is non-zero, with a margin of one pixel."""
    mask = torch.stack([img != 0 for img in images]).any(0)
    if not mask.any():
        return slice(None), slice(None)
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    r0, r1 = max(0, int(rows[0]) - 1), min(mask.shape[0], int(rows[-1]) + 2)
    c0, c1 = max(0, int(cols[0]) - 1), min(mask.shape[1], int(cols[-1]) + 2)
    return slice(r0, r1), slice(c0, c1)


def template_grid(templates: Templates, path: str | os.PathLike, max_units: int = 16, title: str | None = None) -> str:
    """A grid of the first ``max_units`` templates (summed over input channels), each on its own symmetric
    diverging colour scale (red positive, blue negative), with its unit and bias. The pictures are cropped to
    the templates' support (their receptive field), which the title states."""
    k = min(max_units, templates.weights.shape[0])
    cols = min(8, k)
    rows = math.ceil(k / cols)
    images = [_image(templates.weights[i].detach().cpu().to(torch.float64)) for i in range(k)]
    rs, cs = _support(images)
    full = images[0].shape
    fig = _figure(figsize=(1.35 * cols + 0.4, 1.5 * rows + 0.8), layout="constrained")
    site = templates.site
    where = f"position {templates.position}" if templates.position else "features"
    kind = "local affine maps at the given input" if templates.local else "exact templates"
    crop = "" if (rs, cs) == (slice(None), slice(None)) or images[0][rs, cs].shape == full else \
        f"\ninput rows {rs.start}..{rs.stop - 1}, columns {cs.start}..{cs.stop - 1} of {tuple(full)} (the support)"
    fig.suptitle(title or f"Site {site.index} ({site.kind}, {site.module_path or site.node}): {kind}, {where}{crop}",
                 fontsize=9)
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = images[i][rs, cs]
        m = float(img.abs().max()) or 1.0
        ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
        ax.set_title(f"unit {int(templates.units[i])}\nb={float(templates.bias[i]):.2g}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def similarity_histograms(results: Mapping[str, Similarity], path: str | os.PathLike, bins: int = 40) -> str:
    """One panel per model: histograms of the similarity of same-class and different-class pairs (evaluation
    split), with the gap and the nearest-class-mean accuracy in the panel's title."""
    fig = _figure(figsize=(4.6 * len(results), 3.4))
    for i, (name, s) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        same, diff = s.pairs()
        lo = float(torch.cat([same, diff]).min())
        hi = float(torch.cat([same, diff]).max())
        edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).tolist()
        ax.hist(diff.numpy(), bins=edges, alpha=0.6, density=True, label=f"different class ({diff.numel()})",
                color="tab:gray")
        ax.hist(same.numpy(), bins=edges, alpha=0.6, density=True, label=f"same class ({same.numel()})",
                color="tab:green")
        ax.set_title(f"{name}: {s.metric} gradient similarity\ngap {s.gap:.3g}, NCM acc {s.ncm_accuracy:.3f}, "
                     f"model acc {s.model_accuracy:.3f}", fontsize=8)
        ax.set_xlabel("similarity")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return _save(fig, path)


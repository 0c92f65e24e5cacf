"""The experiments' pictures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend change). Each function writes one PNG and returns its path. Error bars are ± one standard deviation
over the seeds; the dots are the individual seeds.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from .result import Row

DPI = 110


def _figure(**kwargs: Any) -> Any:
    from matplotlib.figure import Figure  # imported here: importing relu2dlgn.experiments stays light
    return Figure(**kwargs)


def _save(fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _scale(row: Row) -> float:
    return 100.0 if row.unit == "accuracy" else 1.0


def bar_chart(rows: Sequence[Row], path: str, title: str, reference: float | None = None,
              reference_label: str = "source network") -> str:
    """Horizontal bars: each row's mean (accuracies in %) with ± std and its seeds as dots; a dashed line at
    ``reference`` (an accuracy fraction)."""
    fig = _figure(figsize=(8.0, 0.55 * len(rows) + 1.4))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        s = _scale(r)
        ax.barh(y, r.mean * s, xerr=r.std * s if len(r.values) > 1 else None, color="tab:blue", alpha=0.75,
                capsize=3)
        ax.plot([v * s for v in r.values], [y] * len(r.values), "k.", ms=4)
        ax.text(r.mean * s, y, f"  {r.formatted()}", va="center", fontsize=7)
    if reference is not None:
        ax.axvline(100 * reference, color="tab:red", ls="--", lw=1, label=f"{reference_label} {100 * reference:.2f} %")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_yticks(ys)
    ax.set_yticklabels([r.name for r in rows], fontsize=7)
    lo = min([min(r.values) * _scale(r) for r in rows if r.values] + ([100 * reference] if reference else []))
    ax.set_xlim(max(0.0, lo - 10), 112)
    ax.set_xlabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def site_chart(per_site: Mapping[str, Sequence[Row]], summary: Mapping[str, Sequence[Row]], path: str,
               title: str) -> str:
    """Left: accuracy with one site's gates shuffled across examples, per site, one line per model. Right: the
    other conditions (no shuffle, all shuffled, layers permuted, ...) as grouped bars per model."""
    fig = _figure(figsize=(11.0, 3.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for (model, rows), c in zip(per_site.items(), colors):
        xs = list(range(len(rows)))
        left.errorbar(xs, [100 * r.mean for r in rows], yerr=[100 * r.std for r in rows], color=c, marker="o",
                      ms=3, capsize=2, label=model)
        left.set_xticks(xs)
        left.set_xticklabels([r.name for r in rows], fontsize=6, rotation=60)
    left.set_ylabel("validation accuracy (%)")
    left.set_xlabel("gate site shuffled across examples")
    left.set_ylim(0, 105)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    names = list(dict.fromkeys(r.name for rows in summary.values() for r in rows))
    width = 0.8 / max(1, len(summary))
    for k, ((model, rows), c) in enumerate(zip(summary.items(), colors)):
        by_name = {r.name: r for r in rows}
        xs = [i + (k - (len(summary) - 1) / 2) * width for i in range(len(names))]
        means = [100 * by_name[n].mean if n in by_name and by_name[n].values else 0.0 for n in names]
        errs = [100 * by_name[n].std if n in by_name else 0.0 for n in names]
        right.bar(xs, means, width, yerr=errs, color=c, alpha=0.8, capsize=2, label=model)
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names, fontsize=6, rotation=30, ha="right")
    right.set_ylim(0, 105)
    right.legend(fontsize=7)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def curve_chart(curves: Mapping[str, Sequence[Sequence[dict[str, Any]]]], keys: Sequence[tuple[str, str]],
                path: str, title: str) -> str:
    """One panel per ``(key, label)``: the measurement ``key`` against the epoch, mean ± std over the seeds'
    curves, one line per run kind (``curves[kind]`` is a list of per-seed curves of ``{"epoch", key...}``)."""
    fig = _figure(figsize=(4.2 * len(keys), 3.4))
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for i, (key, label) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for (kind, per_seed), c in zip(curves.items(), colors):
            epochs = sorted({p["epoch"] for curve in per_seed for p in curve})
            means, stds = [], []
            for e in epochs:
                vals = [p[key] for curve in per_seed for p in curve if p["epoch"] == e and p.get(key) is not None]
                m = sum(vals) / len(vals) if vals else float("nan")
                sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
                means.append(m)
                stds.append(sd)
            ax.plot(epochs, means, marker="o", ms=3, color=c, label=kind)
            ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=c, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)

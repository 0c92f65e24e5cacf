"""Draw docs/images/dlgn.png: a ReLU network and the DLGN that ``relu2dlgn.convert`` makes of it.

A schematic (no model is run): the source's layers are copied twice with the same weights; the gating copy
loses its activations (so every pre-activation ``q_l`` is an affine function of ``x``) and feeds the gates
``g_l = 1(q_l > 0)`` (soft ``sigmoid(beta q_l)`` in training) to the value copy, where each activation becomes
a multiplication by its gate. Run ``python docs/make_figure.py`` to redraw it.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images", "dlgn.png")

LAYER = "#dfe9f5"      # a weight layer (conv / linear + batch norm)
RELU = "#f6d5b8"       # a nonlinearity that is a gate site
GATE = "#cfe8cf"       # a gate applied in the value network
LIN = "#eeeeee"        # the gating copy with the activation removed (identity)
W, H = 1.25, 0.62      # box size


def box(ax, x, y, text, color, *, w=W, h=H, style="round,pad=0.02,rounding_size=0.08", lw=1.0, ls="-"):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, fc=color, ec="#333333", lw=lw,
                                ls=ls))
    ax.text(x, y, text, ha="center", va="center", fontsize=9.5)


def arrow(ax, a, b, *, color="#333333", ls="-", lw=1.2, rad=0.0):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=11, color=color, lw=lw, ls=ls,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))


def chain(ax, y, items, x0=0.0, dx=1.6):
    """Boxes left to right at height y, joined by arrows; returns their x positions."""
    xs = [x0 + i * dx for i in range(len(items))]
    for x, (text, color) in zip(xs, items):
        if color is None:
            ax.text(x, y, text, ha="center", va="center", fontsize=11)
        else:
            box(ax, x, y, text, color)
    for (xa, (_, ca)), (xb, (_, cb)) in zip(zip(xs, items), zip(xs[1:], items[1:])):
        wa = 0.48 if ca is None else W / 2
        wb = 0.25 if cb is None else W / 2
        arrow(ax, (xa + wa, y), (xb - wb, y))
    return xs


def main(out: str = OUT) -> str:
    fig, ax = plt.subplots(figsize=(11.5, 6.2))
    ax.set_xlim(-1.0, 13.6)
    ax.set_ylim(-4.75, 1.55)
    ax.axis("off")

    # the source ReLU network
    ax.text(-0.9, 1.25, "source ReLU network", fontsize=12, fontweight="bold", va="center")
    chain(ax, 0.45, [("$x$", None), ("conv + BN\n$W_1$", LAYER), ("ReLU", RELU), ("max-pool", RELU),
                     ("conv + BN\n$W_2$", LAYER), ("ReLU", RELU), ("linear\n$W_3$", LAYER), ("$y$", None)])
    ax.text(12.4, 0.45, "gate sites: each ReLU\ncall, each max-pool", fontsize=9, va="center", color="#7a4a1e")

    ax.plot([-0.9, 13.4], [-0.45, -0.45], color="#999999", lw=0.8, ls=":")
    ax.text(-0.9, -0.8, "dlgn = relu2dlgn.convert(model)", fontsize=12, fontweight="bold", va="center",
            family="monospace")

    # gating network: the same layers, activations removed -> deep linear
    yg, yv = -1.75, -3.85
    ax.text(-0.9, yg + 0.62, "gating network (deep linear: every pre-activation $q$ is affine in $x$)", fontsize=10,
            style="italic", va="center")
    xs = chain(ax, yg, [("$x$", None), ("conv + BN\n$W_1$", LAYER), ("identity", LIN), ("avg-pool", LIN),
                        ("conv + BN\n$W_2$", LAYER)])
    ax.text(xs[-1] + 0.8, yg, "(nothing after the last\ngate site is kept)", fontsize=8.5, va="center",
            color="#555555")

    # value network: the same layers, each activation a multiplication by its gate
    ax.text(-0.9, yv - 0.62, "value network (for fixed gates: affine in its input, $x$ or ones)", fontsize=10,
            style="italic", va="center")
    xv = chain(ax, yv, [("$x$ or 1", None), ("conv + BN\n$W_1'$", LAYER), ("$\\times\\, g_1$", GATE),
                        ("pick by $g_2$\nper window", GATE), ("conv + BN\n$W_2'$", LAYER), ("$\\times\\, g_3$", GATE),
                        ("linear\n$W_3'$", LAYER), ("$y$", None)])

    # gates: from the gating pre-activations down to the value network
    labels = ["$g_1 = 1(q_1 > 0)$", "$g_2$ = arg max of\neach pool window", "$g_3 = 1(q_3 > 0)$"]
    for src, dst, text in zip((xs[1], xs[2], xs[4]), (xv[2], xv[3], xv[5]), labels):
        start = (src + W / 2 - 0.05, yg - H / 2)
        end = (dst, yv + H / 2)
        arrow(ax, start, end, color="#2e7d32", lw=1.4)
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(mx + 0.1, my + 0.1, text, fontsize=8.5, color="#2e7d32", va="center", ha="left")
    ax.text(12.4, yg - 1.05, "hard gates in eval();\nsoft $\\sigma(\\beta q)$ in train()\n(softmax over a window\n"
            "for max-pool)", fontsize=8.5, va="center", color="#2e7d32")
    ax.text(12.4, yv - 0.05, "$W'$ starts as $W$:\nboth copies start\nfrom the source's\nweights", fontsize=8.5,
            va="center", color="#333333")

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())

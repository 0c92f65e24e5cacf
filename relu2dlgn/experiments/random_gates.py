"""``random_gates``: the contrast row of ``fixed_gates`` — fixed *random* gates.

Claim (NeurIPS 2020, "FRNPF"): with the gates of a randomly initialised network, frozen, the weights trained
from scratch reach much less (67.09 % vs 79.68 % with learnt gates and 80.32 % for the ReLU net, CIFAR-10).

Protocol: as :mod:`~relu2dlgn.experiments.fixed_gates`, but the frozen gating network is a random init of the
source architecture (seed ``10000 + k``; batch-norm statistics at their init values), independent of the value
network's init (seed ``k``: the paper's FRNPF(II)):

1. **random ReLU gates** — the gating network is the architecture with its ReLUs (``mode="dgn"``);
2. **random linear gates** — its deep linear version (``mode="dlgn"``);
3. contrast: the learnt source gates row of ``fixed_gates`` (same seeds, same budget; shared when run together).

Verdict: the claim holds when the random-ReLU-gates row is clearly below the learnt-gates row (by more than one
point and more than twice their pooled standard deviation).
"""
from __future__ import annotations

import os
import time
from typing import Any

from .common import (NEURIPS2020, PAPER_FRNPF, PAPER_FRNPF_RATIO, base_protocol, clearly_below, finish, open_setup,
                     pct, ratio, run_row)
from .config import ExperimentConfig
from .figures import bar_chart
from .fixed_gates import learnt_rows
from .result import ExperimentResult
from .runs import gating_of, value_on_gates
from .setup import Setup

NAME = "random_gates"
CLAIM = "fixed random gates do much worse than fixed learnt gates (the contrast row of fixed_gates)"
GATING_SEED = 10_000


def random_gates(model: str | None = None, *, config: ExperimentConfig | None = None, setup: Setup | None = None,
                 **options: Any) -> ExperimentResult:
    """Run the experiment (see the module docstring); arguments as
    :func:`~relu2dlgn.experiments.fixed_gates`."""
    setup = open_setup(NAME, model, config, setup, options)
    started = time.perf_counter()
    source = setup.source_accuracy
    rows = []
    for mode, what in (("dgn", "random ReLU gates"), ("dlgn", "random linear gates")):
        runs = [value_on_gates(setup, ("random", mode, GATING_SEED + s),
                               gating_of(setup, "random", mode, GATING_SEED + s), s) for s in setup.cfg.seed_list()]
        rows.append(run_row(f"{what} (frozen) + value net from scratch", runs,
                        note=f"gating = random init ({mode.upper()}, seed {GATING_SEED}+k), frozen; value = "
                             f"independent random init (seed k), trained",
                        paper=PAPER_FRNPF if mode == "dgn" else ""))
    learnt, _ = learnt_rows(setup)
    rows.append(learnt)
    random_relu = rows[0]
    agrees = clearly_below(random_relu, learnt)
    protocol = {**base_protocol(setup),
                "frozen": f"the random gating network (seed {GATING_SEED}+k, batch norm at init statistics, hard "
                          f"gates); the value network (seed k) is trained, cross-entropy only, value input x"}
    result = ExperimentResult(
        NAME, CLAIM, NEURIPS2020, protocol, rows,
        headline=f"random ReLU gates: {random_relu.formatted()} = {pct(ratio(random_relu.mean, source))} of the "
                 f"source, vs learnt gates {learnt.formatted()} = {pct(ratio(learnt.mean, source))}",
        paper=f"FRNPF(II) 67.09 % = {pct(PAPER_FRNPF_RATIO)} of the ReLU network, vs FLNPF 79.68 %",
        verdict=("agrees" if agrees else "disagrees") +
                f": random gates are {100 * (learnt.mean - random_relu.mean):.2f} points below learnt gates "
                f"(criterion: > max(1 point, 2 pooled std))",
        agrees=agrees, out=setup.out)
    result.figure = bar_chart(rows, os.path.join(setup.out, f"{NAME}.png"),
                              "Fixed random vs learnt gates, value network trained from scratch", reference=source)
    return finish(setup, result, started)

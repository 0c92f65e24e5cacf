"""``fixed_gates``: do the learnt gates carry the information?

Claim (NeurIPS 2020, "FLNPF"): copy the gates of a trained ReLU network, freeze them, re-initialise the weights
and train them from scratch: the network recovers nearly its accuracy (79.68 % vs 80.32 % on CIFAR-10, 99.2 %).

Protocol, on the converted source network:

1. **learnt source gates** — the gating network is the trained source itself (``convert(source, mode="dgn")``:
   its gates are exactly the source's ReLU / max-pool decisions), frozen (hard gates; weights and batch-norm
   statistics untouched); the value network is a fresh random init of the architecture (the model's own init,
   seed k) and is trained from scratch for ``epochs`` epochs, cross-entropy only, value input ``x`` — the
   papers' FLNPF on a real model;
2. **learnt DLGN gates** — the same with the linear gating network of the learnt DLGN (a run directory's
   fine-tuned ``model/``, or the source converted and fine-tuned here with distillation, first seed);
3. references: the source network's accuracy, and the learnt DLGN's own.

Verdict: the claim holds when (1) reaches at least 95 % of the source's accuracy. The contrast row (random
gates) is :mod:`relu2dlgn.experiments.random_gates`.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .common import (NEURIPS2020, PAPER_FLNPF, PAPER_FLNPF_RATIO, PAPER_RELU, base_protocol, finish, open_setup,
                     pct, ratio, run_row)
from .config import ExperimentConfig
from .figures import bar_chart
from .result import ExperimentResult, Row
from .runs import accuracy, gating_of, learnt_dlgn, value_on_gates
from .setup import Setup

NAME = "fixed_gates"
CLAIM = ("the learnt gates carry most of the information: a value network trained from scratch on fixed learnt "
         "gates recovers nearly the network's accuracy")
THRESHOLD = 0.95
LEARNT_DGN = "learnt source gates (frozen) + value net from scratch"
LEARNT_DLGN = "learnt DLGN gates (frozen) + value net from scratch"


def learnt_rows(setup: Setup) -> tuple[Row, Row]:
    """The two trained rows of this experiment (memoised on ``setup``; ``random_gates`` shows them too)."""
    seeds = setup.cfg.seed_list()
    dgn = gating_of(setup, "learnt", "dgn")
    dlgn = gating_of(setup, "learnt", "dlgn")
    _, where = learnt_dlgn(setup)
    r1 = run_row(LEARNT_DGN, [value_on_gates(setup, ("learnt", "dgn"), dgn, s) for s in seeds],
             note="gating = the trained source (DGN), frozen; value = fresh random init, trained", paper=PAPER_FLNPF)
    r2 = run_row(LEARNT_DLGN, [value_on_gates(setup, ("learnt", "dlgn"), dlgn, s) for s in seeds],
             note=f"gating = linear gating net of {where}, frozen; value = fresh random init, trained")
    return r1, r2


def fixed_gates(model: str | None = None, *, config: ExperimentConfig | None = None, setup: Setup | None = None,
                **options: Any) -> ExperimentResult:
    """Run the experiment (see the module docstring) and write ``fixed_gates.{json,md,png}`` to the output
    directory. ``model``: a model spec or a run directory (default: the main job's source, trained here);
    ``options``: :class:`~relu2dlgn.experiments.ExperimentConfig` options by name (``seeds=1``, ``epochs=2``,
    ``data="cifar10"``, ``out=...``); ``setup``: a shared :class:`Setup` instead (``run_all``)."""
    setup = open_setup(NAME, model, config, setup, options)
    started = time.perf_counter()
    source = setup.source_accuracy
    r_dgn, r_dlgn = learnt_rows(setup)
    learnt, where = learnt_dlgn(setup)
    rows = [Row("source network", [source], note="reference", paper=PAPER_RELU),
            Row("learnt DLGN itself", [accuracy(setup, learnt)], note=f"reference: {where}"), r_dgn, r_dlgn]
    share = ratio(r_dgn.mean, source)
    protocol = {**base_protocol(setup),
                "frozen": "the gating network (hard gates, weights and batch-norm statistics); the value network "
                          "is re-initialised and trained, cross-entropy only, value input x",
                "learnt DLGN": where}
    result = ExperimentResult(
        NAME, CLAIM, NEURIPS2020, protocol, rows,
        headline=f"learnt source gates + value net from scratch: {r_dgn.formatted()} = {pct(share)} of the source "
                 f"({pct(source)}); learnt DLGN gates: {r_dlgn.formatted()} = {pct(ratio(r_dlgn.mean, source))}",
        paper=f"FLNPF 79.68 % = {pct(PAPER_FLNPF_RATIO)} of the ReLU network's 80.32 %",
        verdict=("agrees" if share >= THRESHOLD else "disagrees") +
                f": learnt gates recover {pct(share)} of the source (criterion >= {pct(THRESHOLD)})",
        agrees=share >= THRESHOLD, out=setup.out)
    result.figure = bar_chart(rows[1:], os.path.join(setup.out, f"{NAME}.png"),
                              "Fixed learnt gates, value network trained from scratch", reference=source)
    return finish(setup, result, started)

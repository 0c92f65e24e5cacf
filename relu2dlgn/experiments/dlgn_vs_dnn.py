"""``dlgn_vs_dnn``: how much of the ReLU network's accuracy does a DLGN recover?

Claim (arXiv 2110.03403): a DLGN "recovers more than 83.5 % of the performance of state-of-the-art DNNs" on
CIFAR-10/100 (each trained from scratch).

Protocol, all rows with the same options and ``epochs`` epochs, ``seeds`` seeds:

1. **ReLU network from scratch** — the source architecture from a random init (``train_classifier``);
2. **DLGN from scratch** — ``fresh_dlgn`` (gating and value networks from independent random inits), both
   networks trained, no distillation: the papers' DLGN;
3. **DLGN converted + fine-tuned** — the trained source converted into a DLGN and fine-tuned, both networks,
   with distillation from the source: what relu2dlgn offers;
4. reference: the trained source network itself (its own budget, ``source_epochs``, or its checkpoint).

Verdict: the claim holds when (2) reaches more than 83.5 % of (1).
"""
from __future__ import annotations

import os
import time
from typing import Any

from .common import (DISENTANGLING, PAPER_DLGN_RATIO, PAPER_RELU, base_protocol, finish, open_setup, pct, ratio,
                     run_row)
from .config import ExperimentConfig
from .figures import bar_chart
from .result import ExperimentResult, Row
from .runs import finetuned, relu_scratch, scratch_dlgn
from .setup import Setup

NAME = "dlgn_vs_dnn"
CLAIM = "a DLGN recovers most of the ReLU network's accuracy (more than 83.5 % on CIFAR-10/100)"


def dlgn_vs_dnn(model: str | None = None, *, config: ExperimentConfig | None = None, setup: Setup | None = None,
                **options: Any) -> ExperimentResult:
    """Run the experiment (see the module docstring); arguments as
    :func:`~relu2dlgn.experiments.fixed_gates`."""
    setup = open_setup(NAME, model, config, setup, options)
    started = time.perf_counter()
    source = setup.source_accuracy
    seeds = setup.cfg.seed_list()
    epochs = setup.cfg.training.epochs
    relu = run_row(f"ReLU network from scratch, {epochs} ep", [relu_scratch(setup, s) for s in seeds],
               note="train_classifier from a random init", paper=PAPER_RELU)
    scratch = run_row(f"DLGN from scratch, {epochs} ep", [scratch_dlgn(setup, s) for s in seeds],
                  note="fresh_dlgn (independent gating/value inits), no distillation",
                  paper=f"> {pct(PAPER_DLGN_RATIO)} of the DNN")
    converted = run_row(f"DLGN converted + fine-tuned, {epochs} ep", [finetuned(setup, s) for s in seeds],
                    note="convert(source) + finetune with distillation")
    rows = [Row("source network", [source], note="reference (its own budget)"), relu, scratch, converted]
    share = ratio(scratch.mean, relu.mean)
    protocol = {**base_protocol(setup), "frozen": "nothing; every row trained for the same epochs"}
    result = ExperimentResult(
        NAME, CLAIM, DISENTANGLING, protocol, rows,
        headline=f"DLGN from scratch {scratch.formatted()} = {pct(share)} of the ReLU net from scratch "
                 f"({relu.formatted()}); converted + fine-tuned {converted.formatted()} = "
                 f"{pct(ratio(converted.mean, source))} of the source",
        paper=f"DLGN > {pct(PAPER_DLGN_RATIO)} of state-of-the-art DNNs (CIFAR-10/100)",
        verdict=("agrees" if share > PAPER_DLGN_RATIO else "disagrees") +
                f": {pct(share)} (criterion > {pct(PAPER_DLGN_RATIO)})",
        agrees=share > PAPER_DLGN_RATIO, out=setup.out)
    result.figure = bar_chart(rows, os.path.join(setup.out, f"{NAME}.png"),
                              f"ReLU network vs DLGN, {epochs} epochs each", reference=source)
    return finish(setup, result, started)

"""``relu2dlgn experiment all``: the six experiments on one shared :class:`Setup` (the source trained once, the
runs that several experiments share trained once), and ``OUT/summary.md`` + ``OUT/summary.json``: one row per
experiment — the claim, the paper's number, ours, the verdict — followed by every experiment's table and figure.

``npk_vs_training`` runs first, so that the DLGN runs it shares with ``dlgn_vs_dnn`` and ``constant_input``
record their kernels while they train (an experiment's time then includes the shared runs it started).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Sequence

from ..errors import OptionError
from ..utils.fs import atomic_write_text
from .config import EXPERIMENTS, ExperimentConfig
from .constant_input import constant_input
from .dlgn_vs_dnn import dlgn_vs_dnn
from .fixed_gates import fixed_gates
from .npk_vs_training import npk_vs_training
from .random_gates import random_gates
from .result import ExperimentResult
from .common import open_setup
from .setup import Setup
from .shuffle_gates import shuffle_gates

log = logging.getLogger(__name__)

FUNCTIONS: dict[str, Callable[..., ExperimentResult]] = {
    "fixed_gates": fixed_gates, "random_gates": random_gates, "constant_input": constant_input,
    "shuffle_gates": shuffle_gates, "dlgn_vs_dnn": dlgn_vs_dnn, "npk_vs_training": npk_vs_training}
ORDER = ("npk_vs_training", "dlgn_vs_dnn", "constant_input", "fixed_gates", "random_gates", "shuffle_gates")
SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"


def run_all(model: str | None = None, *, config: ExperimentConfig | None = None, setup: Setup | None = None,
            only: Sequence[str] | None = None, **options: Any) -> list[ExperimentResult]:
    """Run the experiments (all six, or those named in ``only``) on one shared setup, writing each one's files
    and ``summary.md`` / ``summary.json`` to the output directory (default ``results/all``); returns their
    results in the table's order (``EXPERIMENTS``). Arguments as :func:`~relu2dlgn.experiments.fixed_gates`."""
    names = list(only) if only is not None else list(EXPERIMENTS)
    unknown = [n for n in names if n not in FUNCTIONS]
    if unknown:
        raise OptionError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    setup = open_setup("all", model, config, setup, options)
    started = time.perf_counter()
    machine_before = setup.machine()
    setup.npk_wanted = "npk_vs_training" in names
    results: dict[str, ExperimentResult] = {}
    for name in sorted(names, key=ORDER.index):
        log.info("experiment %s ...", name)
        results[name] = FUNCTIONS[name](setup=setup)
    ordered = [results[n] for n in EXPERIMENTS if n in results]
    write_summary(setup, ordered, time.perf_counter() - started, machine_before)
    return ordered


def summary_rows(results: Sequence[ExperimentResult]) -> list[tuple[str, str, str, str, str, str]]:
    """``(experiment, claim, paper, ours, verdict, seconds)`` per experiment."""
    return [(r.name, r.claim, r.paper, r.headline, r.verdict, f"{r.seconds:.0f}") for r in results]


def write_summary(setup: Setup, results: Sequence[ExperimentResult], seconds: float,
                  machine_before: dict[str, Any]) -> dict[str, str]:
    """``OUT/summary.md`` and ``OUT/summary.json``; returns their paths."""
    machine = setup.machine()
    cfg = setup.cfg
    lines = ["# The papers' experiments on a converted model", "",
             f"Source: {setup.source_protocol()} (validation accuracy {100 * setup.source_accuracy:.2f} %). "
             f"Data: {setup.data_protocol()}. Budget: {cfg.seeds} seed(s), {cfg.training.epochs} epoch(s) per "
             f"training run. Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch "
             f"thread(s), device {machine['device']}, torch {machine['torch']}; load average "
             f"{_load(machine_before)} at the start, {_load(machine)} at the end. Total time {seconds:.0f} s "
             f"({seconds / 60:.1f} min).", ""]
    if cfg.quick:
        lines += ["**--quick smoke budget: these numbers show that everything runs; they are no evidence for or "
                  "against the claims.**", ""]
    lines += ["| experiment | claim | paper | ours | verdict | time (s) |", "|---|---|---|---|---|---|"]
    for row in summary_rows(results):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines += ["", "Times: each experiment's own wall time; runs shared with an earlier experiment are counted "
                  "there (npk_vs_training, dlgn_vs_dnn and constant_input share the DLGN runs; fixed_gates, "
                  "random_gates and shuffle_gates share the value-network runs).", ""]
    for r in results:
        lines += [r.markdown(), ""]
    os.makedirs(setup.out, exist_ok=True)
    paths = {"md": os.path.join(setup.out, SUMMARY_MD), "json": os.path.join(setup.out, SUMMARY_JSON)}
    atomic_write_text(paths["md"], "\n".join(lines))
    data = {"seconds": seconds, "machine_start": machine_before, "machine_end": machine,
            "source": setup.source_record(), "budget": {"seeds": cfg.seeds, "epochs": cfg.training.epochs,
                                                       "quick": cfg.quick},
            "experiments": [r.as_dict() for r in results]}
    atomic_write_text(paths["json"], json.dumps(data, indent=1, default=str) + "\n")
    log.info("summary: %s", paths["md"])
    return paths


def _load(machine: dict[str, Any]) -> str:
    load = machine.get("load_average")
    return "/".join(f"{v:.2f}" for v in load) if load else "?"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")

"""The papers' experiments, run on a converted real model: each one function (and ``relu2dlgn experiment NAME``)
that trains with the fine-tuning machinery and returns a table (JSON + Markdown) and a figure (PNG).

====================  ==========================================================================================
``fixed_gates``       freeze the learnt gating network, re-initialise the value network, train it
``random_gates``      the same with a gating network at a random init (the contrast row)
``constant_input``    value input ``x`` vs a constant input of ones, same budget
``shuffle_gates``     gate masks permuted across examples, and across same-shaped layers (evaluated, retrained)
``dlgn_vs_dnn``       ReLU network vs DLGN from scratch vs DLGN converted + fine-tuned, same epochs
``npk_vs_training``   the NPK of the gates after every epoch: label alignment, kernel-classifier accuracy
====================  ==========================================================================================

Example::

    from relu2dlgn import experiments
    r = experiments.fixed_gates(seeds=1, epochs=1, out="results/fixed_gates")     # trains the default source
    r.rows, r.verdict, r.figure
    experiments.run_all("runs/digits-resnet10t", out="results/all")               # a `relu2dlgn run` directory

Each module's docstring states its protocol and the criterion of its verdict; :mod:`.config` the options,
:mod:`.source` what is read from a run directory, :mod:`.setup` / :mod:`.runs` the shared source and training
runs, :mod:`.result` the tables, :mod:`.figures` the pictures, :mod:`.suite` ``run_all`` and ``summary.md``.
"""
from .config import EXPERIMENTS, ExperimentConfig, ExperimentName
from .constant_input import constant_input
from .dlgn_vs_dnn import dlgn_vs_dnn
from .fixed_gates import fixed_gates
from .npk_vs_training import npk_vs_training
from .random_gates import random_gates
from .result import ExperimentResult, Row
from .setup import Setup
from .shuffle_gates import shuffle_gates
from .suite import run_all

all = run_all  # noqa: A001 - `experiments.all(...)`, as on the command line; not in __all__ (no builtin shadowing)

__all__ = [
    "fixed_gates", "random_gates", "constant_input", "shuffle_gates", "dlgn_vs_dnn", "npk_vs_training", "run_all",
    "ExperimentConfig", "ExperimentName", "EXPERIMENTS", "ExperimentResult", "Row", "Setup",
]

"""``constant_input``: can the value network be trained with a constant input of ones?

Claim (arXiv 2203.16455): "the weights can be trained even with a constant 1 input" without a significant loss
— everything the network needs about the input then flows through the gates.

Protocol: the source converted into a DLGN twice — value input ``x`` (``value_input="input"``) and value input
a tensor of ones shaped like ``x`` (``value_input="ones"``; the gating network still sees ``x``) — each
fine-tuned with both networks trained and distillation from the source (logits + gates), the same options,
seeds and epochs; nothing frozen. The source network is the reference.

Verdict: the claim holds when the ones row is at most 2 points (or twice the pooled standard deviation, if
larger) below the ``x`` row.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .common import EXPLICITISING, base_protocol, finish, open_setup, run_row, within
from .config import ExperimentConfig
from .figures import bar_chart
from .result import ExperimentResult, Row
from .runs import finetuned
from .setup import Setup

NAME = "constant_input"
CLAIM = ("the value network can be trained with a constant-1 input without significant loss: everything flows "
         "through the gates")
INPUT_ROW = "value input x, fine-tuned (both networks, distillation)"
ONES_ROW = "value input ones, fine-tuned (both networks, distillation)"


def constant_input(model: str | None = None, *, config: ExperimentConfig | None = None, setup: Setup | None = None,
                   **options: Any) -> ExperimentResult:
    """Run the experiment (see the module docstring); arguments as
    :func:`~relu2dlgn.experiments.fixed_gates`."""
    setup = open_setup(NAME, model, config, setup, options)
    started = time.perf_counter()
    source = setup.source_accuracy
    seeds = setup.cfg.seed_list()
    with_x = run_row(INPUT_ROW, [finetuned(setup, s, "input") for s in seeds],
                 note="convert(source, value_input='input') + finetune")
    with_ones = run_row(ONES_ROW, [finetuned(setup, s, "ones") for s in seeds],
                    note="convert(source, value_input='ones') + finetune; the gating network sees x")
    rows = [Row("source network", [source], note="reference"), with_x, with_ones]
    agrees = within(with_ones, with_x)
    protocol = {**base_protocol(setup),
                "frozen": "nothing: both networks trained, with distillation from the source (logits + gates)",
                "varied": "only the value network's input: x, or ones shaped like x"}
    diff = 100 * (with_x.mean - with_ones.mean)
    result = ExperimentResult(
        NAME, CLAIM, EXPLICITISING, protocol, rows,
        headline=f"value input ones: {with_ones.formatted()} vs x: {with_x.formatted()} ({diff:+.2f} points lost)",
        paper="no significant loss with a constant 1 input (stated; no number quoted here)",
        verdict=("agrees" if agrees else "disagrees") + f": the ones input loses {diff:.2f} points "
                "(criterion <= max(2 points, 2 pooled std))",
        agrees=agrees, out=setup.out)
    result.figure = bar_chart(rows[1:], os.path.join(setup.out, f"{NAME}.png"),
                              "Value network fed x vs a constant input of ones (same budget)", reference=source)
    return finish(setup, result, started)

"""``npk_vs_training``: are the gates learnt during training? The NPK of the gates, epoch by epoch.

Claim (NeurIPS 2020): the neural path features are learnt during training — the neural path kernel of the
gates aligns with the labels as training goes on (and fixed gates copied later in training are worth more).

Protocol: two fine-tuning runs per seed — a **DLGN from scratch** (``fresh_dlgn``, no distillation; the papers'
setting: gates from a random init) and the **source converted + fine-tuned** (distillation) — the same runs as
``dlgn_vs_dnn`` / ``constant_input`` (shared when run together). After every epoch (and at epoch 0: before
training, batch norm re-estimated), from the run's checkpoint, on the first ``npk_examples`` validation examples
(not trained on):

* ``K = explain.npk(dlgn, x)`` — the exact NPK of the hard gates (bias paths included);
* alignment — ``explain.kernel_alignment(cosine_normalize(K), y)`` = ``<Kc, Y Y^T>_F / (||Kc||_F ||Y Y^T||_F)``,
  ``Y`` one-hot (``alignment_raw``: the same on ``K`` itself);
* kernel classifier — kernel ridge regression on ``Kc`` (``alpha = (Kc_ff + lambda I)^-1 Y_f``,
  ``lambda = 1e-3``) fitted on the even-indexed half of the examples, accuracy on the odd-indexed half;
* the network's own validation accuracy (hard gates) at that epoch;
* reference: the same scores for the input kernel ``<x, x'>`` alone (no gates), the factor every NPK carries.

Verdict: the claim holds when the from-scratch run's mean alignment after the last epoch exceeds its epoch-0
alignment by more than twice the std of the difference over seeds (and by more than 0.01).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from torch import Tensor

from ..dlgn import DLGN
from ..explain import cosine_normalize, kernel_alignment, npk
from ..explain.common import take
from .common import NEURIPS2020, base_protocol, finish, open_setup
from .config import ExperimentConfig
from .figures import curve_chart
from .result import ExperimentResult, Row
from .runs import Run, finetuned, scratch_dlgn
from .setup import Setup

NAME = "npk_vs_training"
CLAIM = "gates are learnt during training: the NPK of the gates aligns with the labels as training goes on"
RIDGE = 1e-3
KINDS = {"DLGN from scratch": "scratch", "converted + fine-tuned": "finetuned"}


def kernel_scores(K: Tensor, y: Tensor, ridge: float = RIDGE) -> dict[str, float]:
    """Alignment of ``K`` with the labels (cosine-normalised and raw) and the accuracy of the kernel ridge
    classifier fitted on the even-indexed examples and scored on the odd-indexed ones (see the module
    docstring)."""
    y = torch.as_tensor(y).long().to(K.device)
    classes = int(y.max()) + 1
    Kc = cosine_normalize(K)
    fit, test = torch.arange(0, len(y), 2, device=K.device), torch.arange(1, len(y), 2, device=K.device)
    Y = torch.nn.functional.one_hot(y[fit], classes).to(Kc.dtype)
    A = Kc[fit][:, fit] + ridge * torch.eye(len(fit), dtype=Kc.dtype, device=Kc.device)
    alpha = torch.linalg.solve(A, Y)
    predicted = (Kc[test][:, fit] @ alpha).argmax(1)
    return {"alignment": kernel_alignment(Kc, y, classes), "alignment_raw": kernel_alignment(K, y, classes),
            "kernel_accuracy": float((predicted == y[test]).double().mean()) if len(test) else float("nan")}


def npk_probe(x: Tensor, y: Tensor) -> Any:
    """The measurement :mod:`relu2dlgn.experiments.runs` records after each epoch of a run."""
    def probe(dlgn: DLGN) -> dict[str, Any]:
        K = npk(dlgn, x.to(dlgn.device))
        return kernel_scores(K, y.to(K.device))
    return probe


def _final(curve: list[dict[str, Any]], key: str) -> float:
    return max(curve, key=lambda p: p["epoch"])[key]


def _initial(curve: list[dict[str, Any]], key: str) -> float:
    return min(curve, key=lambda p: p["epoch"])[key]


def npk_vs_training(model: str | None = None, *, config: ExperimentConfig | None = None,
                    setup: Setup | None = None, **options: Any) -> ExperimentResult:
    """Run the experiment (see the module docstring); arguments as
    :func:`~relu2dlgn.experiments.fixed_gates`."""
    setup = open_setup(NAME, model, config, setup, options)
    started = time.perf_counter()
    setup.npk_wanted = True
    x, y = take(setup.val_loader, setup.cfg.npk_examples)
    assert y is not None
    probe = npk_probe(x, y)
    seeds = setup.cfg.seed_list()
    runs: dict[str, list[Run]] = {
        "DLGN from scratch": [scratch_dlgn(setup, s, probe) for s in seeds],
        "converted + fine-tuned": [finetuned(setup, s, "input", probe) for s in seeds]}
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for kind, rs in runs.items():
        curves[kind] = []
        for r in rs:
            assert r.curve is not None
            acc = {h["epoch"]: h.get("val_acc") for h in r.history}
            curves[kind].append([{**p, "val_acc": acc.get(p["epoch"])} for p in r.curve])
    flat = x.reshape(len(x), -1).double()
    baseline = kernel_scores(flat @ flat.T, y)
    rows = [Row("input kernel <x, x'> (no gates): alignment", [baseline["alignment"]], unit="score",
                note="reference"),
            Row("input kernel <x, x'> (no gates): kernel-classifier accuracy", [baseline["kernel_accuracy"]],
                note="reference")]
    for kind, cs in curves.items():
        for key, label, unit in (("alignment", "NPK-label alignment", "score"),
                                 ("kernel_accuracy", "NPK kernel-classifier accuracy", "accuracy")):
            rows.append(Row(f"{kind}: {label}, epoch 0", [_initial(c, key) for c in cs], unit=unit,
                            note="before training (batch norm re-estimated)"))
            rows.append(Row(f"{kind}: {label}, last epoch", [_final(c, key) for c in cs], unit=unit,
                            note=f"after {setup.cfg.training.epochs} epoch(s)"))
    gains = [_final(c, "alignment") - _initial(c, "alignment") for c in curves["DLGN from scratch"]]
    gain = Row("gain", gains, unit="score")
    agrees = gain.mean > max(0.01, 2 * gain.std)
    scratch = {r.name: r for r in rows}
    a0 = scratch["DLGN from scratch: NPK-label alignment, epoch 0"]
    a1 = scratch["DLGN from scratch: NPK-label alignment, last epoch"]
    k0 = scratch["DLGN from scratch: NPK kernel-classifier accuracy, epoch 0"]
    k1 = scratch["DLGN from scratch: NPK kernel-classifier accuracy, last epoch"]
    protocol = {**base_protocol(setup),
                "kernel": f"exact NPK of the hard gates on the first {len(y)} validation examples; alignment of the "
                          f"cosine-normalised NPK with Y Y^T; kernel ridge (lambda {RIDGE}) fitted on the "
                          f"even-indexed half, scored on the odd-indexed half",
                "runs": "DLGN from scratch (no distillation) and the source converted + fine-tuned "
                        "(distillation); NPK after every epoch from the run's checkpoints"}
    result = ExperimentResult(
        NAME, CLAIM, NEURIPS2020, protocol, rows,
        headline=f"from scratch, NPK-label alignment {a0.formatted()} -> {a1.formatted()}, kernel classifier "
                 f"{k0.formatted()} -> {k1.formatted()} (input kernel alone: alignment "
                 f"{baseline['alignment']:.3f}, classifier {100 * baseline['kernel_accuracy']:.2f} %)",
        paper="NPFs are learnt during training; gates copied later in training give higher accuracy (figure; no "
              "alignment number quoted here)",
        verdict=("agrees" if agrees else "disagrees") + f": alignment gain {gain.formatted()} (criterion > "
                "max(0.01, 2 std))" if not math.isnan(gain.mean) else "n/a",
        agrees=agrees, out=setup.out, details={"curves": curves, "input_kernel": baseline})
    result.figure = curve_chart(curves, [("alignment", "NPK-label alignment (cosine-normalised)"),
                                         ("kernel_accuracy", "NPK kernel classifier accuracy"),
                                         ("val_acc", "network validation accuracy")],
                                os.path.join(setup.out, f"{NAME}.png"), "Neural path kernel during training")
    return finish(setup, result, started)

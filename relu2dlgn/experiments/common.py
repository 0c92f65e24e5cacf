"""What every experiment does around its own measurements: open (or reuse) the :class:`Setup`, describe the
shared protocol, finish (time, files, log), and the papers' reference numbers.

The papers' numbers (checked against the sources named):

* NeurIPS 2020 (Lakshminarayanan & Singh, arXiv 2006.10529), table of the authors' code README
  (github.com/chandrashekar-lakshminarayanan/neural-path-kernel), conv net "GCONV" (4 conv + global average
  pooling + 2 dense), Adam (lr 3e-4, batch 32), CIFAR-10, mean ± std of the best test accuracy over 200 epochs,
  5 runs: ReLU 80.32 ± 0.35, FLNPF (gates copied from the trained ReLU net and frozen, value network trained
  from scratch) 79.68 ± 0.32, FRNPF(II) (random gates, independent init) 67.09 ± 0.58, FRNPF(DI) 67.08 ± 0.27,
  DNFPL (gates learnt in a decoupled gating network) 77.12 ± 0.19.
* arXiv 2110.03403 (Lakshminarayanan & Singh): the DLGN "recovers more than 83.5 % of the performance of
  state-of-the-art DNNs" on CIFAR-10/100.
* arXiv 2203.16455 (Lakshminarayanan, Singh & Rajkumar): "the weights can be trained even with a constant 1
  input" and "the gating masks can be shuffled, without any significant loss in performance" (stated in the
  abstract; no number is quoted here).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

from ..errors import OptionError
from .config import ExperimentConfig
from .result import ExperimentResult, Row
from .setup import Setup, config_from

log = logging.getLogger(__name__)

NEURIPS2020 = "Lakshminarayanan & Singh, NeurIPS 2020, arXiv 2006.10529"
DISENTANGLING = "Lakshminarayanan & Singh, arXiv 2110.03403"
EXPLICITISING = "Lakshminarayanan, Singh & Rajkumar, arXiv 2203.16455"
GCONV = "GCONV, Adam, CIFAR-10"
PAPER_RELU = f"ReLU 80.32 ± 0.35 % ({GCONV})"
PAPER_FLNPF = f"FLNPF 79.68 ± 0.32 % ({GCONV})"
PAPER_FRNPF = f"FRNPF(II) 67.09 ± 0.58 % ({GCONV})"
PAPER_FLNPF_RATIO = 79.68 / 80.32
PAPER_FRNPF_RATIO = 67.09 / 80.32
PAPER_DLGN_RATIO = 0.835


def open_setup(name: str, model: str | None, config: ExperimentConfig | None, setup: Setup | None,
               options: dict[str, Any]) -> Setup:
    """``setup`` itself (shared by ``run_all``), or a new one from ``model``, ``config`` and leaf options, writing
    to ``out`` (default ``results/<name>``)."""
    if setup is not None:
        if model is not None or config is not None or options:
            raise OptionError(f"{name}(): pass either setup= (a shared Setup) or model/config/options, not both")
        return setup
    cfg, given = config_from(model, config, **options)
    return Setup(cfg, cfg.out or os.path.join("results", name), given=given)


def base_protocol(setup: Setup) -> dict[str, Any]:
    """The protocol entries every training experiment shares."""
    t = setup.cfg.training
    o = t.optim
    return {
        "data": setup.data_protocol(),
        "source network": setup.source_protocol(),
        "training": f"{t.epochs} epoch(s) per run, {o.optimizer} lr {o.lr} (warm-up {o.warmup_fraction:.0%}, cosine "
                    f"to 0), weight decay {o.weight_decay}, batch {setup.dataset.batch_size}; soft gates "
                    f"sigmoid(beta q) in training (beta {t.gates.beta_start or 'dlgn.beta'} -> "
                    f"{t.gates.beta_end or '3x'}), hard gates in evaluation; batch norm re-estimated on "
                    f"{t.gates.recalibrate_bn} batches before epoch 1 (unfrozen networks only)",
        "seeds": f"{setup.cfg.seeds} (seeds {', '.join(str(s) for s in setup.cfg.seed_list())}); mean ± sample std",
        "reported": "validation accuracy after the last epoch (the paper reports the best epoch's)",
        **({"budget": "--quick smoke budget: these numbers show that everything runs; they are no evidence for or "
                      "against the claim"} if setup.cfg.quick else {}),
    }


def finish(setup: Setup, result: ExperimentResult, started: float) -> ExperimentResult:
    """Stamp the time and the machine, write ``NAME.json`` / ``NAME.md`` to ``setup.out`` and log the verdict."""
    result.seconds = time.perf_counter() - started
    result.details.setdefault("machine", setup.machine())
    result.write()
    log.info("%s", result)
    return result


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def clearly_below(low: Row, high: Row, margin: float = 0.01) -> bool:
    """``low``'s mean is below ``high``'s by more than ``margin`` and by more than twice their pooled std."""
    pooled = math.sqrt((low.std ** 2 + high.std ** 2) / 2)
    return high.mean - low.mean > max(margin, 2 * pooled)


def within(a: Row, b: Row, margin: float = 0.02) -> bool:
    """``a``'s mean is at most ``margin`` (or twice the pooled std, if larger) below ``b``'s."""
    pooled = math.sqrt((a.std ** 2 + b.std ** 2) / 2)
    return b.mean - a.mean <= max(margin, 2 * pooled)


def pct(v: float) -> str:
    return f"{100 * v:.2f} %"


def run_row(name: str, runs: Sequence[Any], note: str = "", paper: str = "") -> Row:
    """A row of training runs (:class:`~relu2dlgn.experiments.runs.Run`): their accuracies, and per run its seed,
    accuracy, final validation loss and time."""
    return Row(name, [r.accuracy for r in runs], note, paper,
               runs=[{"seed": r.seed, "accuracy": r.accuracy, "val_loss": r.history[-1].get("val_loss"),
                      "seconds": round(r.seconds, 1)} for r in runs])

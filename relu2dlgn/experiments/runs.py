"""The training runs the experiments are made of, each one call of the fine-tuning machinery
(:func:`relu2dlgn.finetune` / :func:`relu2dlgn.training.train_classifier`) with ``Setup.cfg.training``'s options
and ``epochs`` epochs, memoised on the :class:`~relu2dlgn.experiments.setup.Setup` so that experiments sharing a
run share its result:

* :func:`finetuned` — the source converted into a DLGN (value input ``x`` or ones) and fine-tuned, both networks,
  with distillation from the source (logits + gates);
* :func:`scratch_dlgn` — a DLGN from a random init (independent for gating and value, ``fresh_dlgn``), no
  distillation;
* :func:`relu_scratch` — the source architecture (a ReLU network) from a random init;
* :func:`value_on_gates` — a given gating network frozen (hard gates, weights and batch-norm statistics
  untouched), the value network re-initialised (a fresh random init of the architecture) and trained.

Each returns a :class:`Run`: the final epoch's validation accuracy (hard gates), the history, the trained model.
With ``Setup.npk_wanted`` the DLGN runs also record the NPK of their gates after every epoch (see
:mod:`relu2dlgn.experiments.npk_vs_training`): the run then writes checkpoints under ``OUT/runs/TAG`` and
removes them once the kernels are computed (``metrics.jsonl`` stays).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..dlgn import DLGN
from ..errors import ConversionError
from ..training import evaluate, finetune, fresh_dlgn, load_checkpoint, recalibrate_bn, train_classifier
from ..training.checkpoint import CHECKPOINT_DIR, MODEL_DIR, checkpoint_dirs
from ..types import Mode, ValueInput
from .setup import Setup

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One training run: ``accuracy`` is the last epoch's validation accuracy with hard gates; ``curve`` the
    per-epoch NPK measurements when they were recorded (epoch 0: before training, after batch-norm
    re-estimation)."""

    tag: str
    seed: int
    accuracy: float
    history: list[dict[str, Any]]
    seconds: float
    model: nn.Module = field(repr=False)
    curve: list[dict[str, Any]] | None = None


NpkProbe = Callable[[DLGN], dict[str, Any]]


def _train_dlgn(setup: Setup, tag: str, seed: int, dlgn: DLGN, probe: NpkProbe | None, **options: Any) -> Run:
    """``finetune(dlgn, ...)`` with the run's options; with ``probe``, measure the gates after every epoch."""
    out_dir = setup.run_dir(f"{tag}-seed{seed}") if probe is not None else None
    cfg = setup.training(seed, out_dir=out_dir, keep_checkpoints=setup.cfg.training.epochs, **options)
    curve = None
    if probe is not None:
        before = copy.deepcopy(dlgn)  # epoch 0: the state finetune evaluates first (batch norm re-estimated)
        if cfg.gates.recalibrate_bn:
            unfrozen = [n for n in ("gating", "value") if not getattr(cfg.gates, f"freeze_{n}")]
            recalibrate_bn(before, setup.train_loader, cfg.gates.recalibrate_bn, before.device, unfrozen)
        curve = [{"epoch": 0, **probe(before.eval())}]
    tick = time.perf_counter()
    teacher = setup.source if cfg.distillation.distill else None
    result = finetune(dlgn, setup.train_loader, setup.val_loader, teacher=teacher, config=cfg,
                      example_inputs=setup.example)
    seconds = time.perf_counter() - tick
    if probe is not None:
        assert out_dir is not None and curve is not None
        snapshot = copy.deepcopy(dlgn)
        for name in checkpoint_dirs(out_dir):
            weights, state = load_checkpoint(os.path.join(out_dir, CHECKPOINT_DIR, name), snapshot.device)
            snapshot.load_state_dict(weights)
            curve.append({"epoch": int(state["epoch"]), **probe(snapshot.eval())})
        shutil.rmtree(os.path.join(out_dir, CHECKPOINT_DIR), ignore_errors=True)
        shutil.rmtree(os.path.join(out_dir, MODEL_DIR), ignore_errors=True)
    return Run(tag, seed, float(result.final["val_acc"]), result.history, seconds, dlgn.eval(), curve)


def _shared(setup: Setup, key: tuple, make: Callable[[NpkProbe | None], Run], probe: NpkProbe | None) -> Run:
    """A memoised DLGN run; a run without a curve is redone when a curve is now wanted."""
    have = setup.memoised(key)
    if have is not None and (probe is None or have.curve is not None):
        return have
    run = make(probe)
    setup.remember(key, run)
    return run


def finetuned(setup: Setup, seed: int, value_input: ValueInput = "input", probe: NpkProbe | None = None) -> Run:
    """The source converted into a DLGN (``value_input``) and fine-tuned with distillation from the source."""
    def make(p: NpkProbe | None) -> Run:
        dlgn = setup.convert(setup.source, value_input=value_input)
        return _train_dlgn(setup, f"finetuned-{value_input}", seed, dlgn, p, distill=True)
    return _shared(setup, ("finetuned", value_input, seed), make, probe if setup.npk_wanted else None)


def scratch_dlgn(setup: Setup, seed: int, probe: NpkProbe | None = None) -> Run:
    """A DLGN from a random init (``fresh_dlgn(make_model, seed)``: gating under ``seed``, value under
    ``seed + 1``), trained without distillation."""
    def make(p: NpkProbe | None) -> Run:
        dlgn = fresh_dlgn(setup.make_model, seed, example_inputs=setup.example).eval()
        return _train_dlgn(setup, "scratch", seed, dlgn, p, distill=False)
    return _shared(setup, ("scratch", seed), make, probe if setup.npk_wanted else None)


def relu_scratch(setup: Setup, seed: int) -> Run:
    """The source architecture from a random init (``torch.manual_seed(seed)``), trained as a plain ReLU
    classifier with the same options and epochs."""
    def make() -> Run:
        model = setup.fresh_model(seed)
        tick = time.perf_counter()
        result = train_classifier(model, setup.train_loader, setup.val_loader, config=setup.training(seed))
        return Run("relu-scratch", seed, float(result.final["val_acc"]), result.history,
                   time.perf_counter() - tick, model.eval())
    return setup.memo(("relu scratch", seed), make)


def learnt_dlgn(setup: Setup) -> tuple[DLGN, str]:
    """The learnt DLGN and where it is from: the run directory's fine-tuned model, or the first seed's
    :func:`finetuned` run."""
    found = setup.run_dlgn()
    if found is not None:
        return found, f"the run's fine-tuned DLGN ({setup.spec.dlgn_dir})"
    run = finetuned(setup, setup.cfg.base_seed)
    return run.model, f"the source converted and fine-tuned here (seed {run.seed}, distillation)"


def gating_of(setup: Setup, kind: str, mode: Mode, seed: int | None = None) -> DLGN:
    """A DLGN whose gating network is the one the experiment freezes (value network: whatever it was):

    * ``kind="learnt"``, ``mode="dgn"``: the trained source network itself (``convert(source, mode="dgn")``);
    * ``kind="learnt"``, ``mode="dlgn"``: the learnt DLGN's linear gating network (:func:`learnt_dlgn`);
    * ``kind="random"``: a random init of the architecture under ``seed`` (a ReLU network for ``"dgn"``, its
      deep linear version for ``"dlgn"``), used as is (batch-norm statistics at their init values).
    """
    if kind == "learnt":
        if mode == "dgn":
            return setup.memo(("dgn",), lambda: setup.convert(copy.deepcopy(setup.source).cpu(), mode="dgn"))
        return learnt_dlgn(setup)[0]
    assert seed is not None
    return setup.memo(("random gating", mode, seed), lambda: setup.convert(setup.fresh_model(seed), mode=mode))


def reinit_value(dlgn: DLGN, setup: Setup, seed: int) -> DLGN:
    """A copy of ``dlgn`` whose value network is a fresh random init of the architecture (``make_model()``
    under ``seed``, converted alike) and whose value input is ``x``; the gating network is copied as is."""
    fresh = setup.convert(setup.fresh_model(seed), mode=dlgn.mode, pool=dlgn.pool)
    model = copy.deepcopy(dlgn).cpu()
    value = {k: v for k, v in fresh.state_dict().items() if k.startswith("value.")}
    missing = sorted(set(k for k in model.state_dict() if k.startswith("value.")) - set(value))
    if missing:
        raise ConversionError(f"re-initialising the value network: a fresh {setup.spec.model} has no "
                              f"{missing[:4]} (the saved model was converted from another architecture?)")
    model.load_state_dict(value, strict=False)
    model.value_input = "input"
    return model


def value_on_gates(setup: Setup, key: tuple, gated: DLGN, seed: int) -> Run:
    """``gated``'s gating network frozen, its value network re-initialised (:func:`reinit_value` under ``seed``)
    and trained from scratch without distillation (``freeze_gating=True``: hard gates, gating weights and
    batch-norm statistics untouched). Memoised under ``key + (seed,)``."""
    def make() -> Run:
        model = reinit_value(gated, setup, seed)
        tick = time.perf_counter()
        result = finetune(model, setup.train_loader, setup.val_loader,
                          config=setup.training(seed, freeze_gating=True, distill=False))
        return Run("value-on-" + "-".join(str(k) for k in key), seed, float(result.final["val_acc"]),
                   result.history, time.perf_counter() - tick, model.eval())
    return setup.memo(("value on gates",) + key + (seed,), make)


def accuracy(setup: Setup, model: nn.Module) -> float:
    """Validation accuracy (hard gates for a DLGN) with the fine-tuning machinery's own evaluation."""
    rt = setup.cfg.training.runtime
    return float(evaluate(model, setup.val_loader, device=rt.device, amp=rt.amp, progress=False)["val_acc"])

"""Where the experiments' source network comes from: a model spec, or the directory of a ``relu2dlgn run`` /
``relu2dlgn finetune`` run.

From a run directory the experiments take

* the source network: ``config.yaml``'s ``source.model``, with the trained weights ``source.checkpoint`` — or,
  for a ``relu2dlgn run`` that trained its source itself, ``source/model/model.safetensors``; a run without
  trained source weights (``finetune --from-scratch`` without ``--checkpoint``) has its source trained here;
* its data options (``config.yaml``'s ``dataset`` section), for every option not given explicitly;
* its fine-tuned DLGN (``model/``), which ``fixed_gates`` (the learnt DLGN gates) and ``shuffle_gates`` (the
  DLGN whose gates are shuffled) read instead of fine-tuning one here.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..data import DataOptions
from ..errors import LoadError
from ..options import load_file
from ..pipeline.runner import CONFIG_FILE
from ..pipeline.steps import SOURCE_DIR
from ..serialize import CONFIG
from ..training.checkpoint import MODEL_DIR
from ..training.student import ClassifierStudent


@dataclass
class SourceSpec:
    """The source network (``model`` spec, trained ``weights`` or ``None`` to train it here) and, for a run
    directory, the run itself, its fine-tuned DLGN directory and its data options."""

    model: str
    weights: str | None
    run_dir: str | None = None
    dlgn_dir: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)


def resolve_source(model: str, checkpoint: str | None = None) -> SourceSpec:
    """A :class:`SourceSpec` for ``model``: a run directory (see the module docstring) or a model spec.

    Raises :class:`~relu2dlgn.errors.LoadError` for a directory that is not a run, or whose config names no
    source model or a checkpoint that does not exist."""
    if not os.path.isdir(model):
        if ":" not in model:
            raise LoadError(f"'{model}' is neither a model spec (timm:NAME, torchvision:NAME, package.module:attr) "
                            f"nor a run directory")
        if checkpoint and not os.path.exists(checkpoint):
            raise LoadError(f"checkpoint '{checkpoint}' does not exist")
        return SourceSpec(model, checkpoint)
    cfg_path = os.path.join(model, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise LoadError(f"'{model}' is a directory but not a relu2dlgn run or finetune run (no {CONFIG_FILE})")
    cfg = load_file(cfg_path)
    src = cfg.get("source") if isinstance(cfg.get("source"), dict) else {}
    spec = src.get("model")
    if not spec:
        raise LoadError(f"{cfg_path} names no source model (source.model)")
    weights = checkpoint or src.get("checkpoint")
    trained_here = os.path.join(model, SOURCE_DIR, MODEL_DIR, ClassifierStudent.WEIGHTS)
    if not weights and os.path.exists(trained_here):
        weights = trained_here
    if weights and not os.path.exists(weights):
        raise LoadError(f"the source weights '{weights}' named by {cfg_path} do not exist here")
    dlgn_dir = os.path.join(model, MODEL_DIR)
    dataset = cfg.get("dataset") if isinstance(cfg.get("dataset"), dict) else {}
    return SourceSpec(spec, weights, model, dlgn_dir if os.path.isfile(os.path.join(dlgn_dir, CONFIG)) else None,
                      dict(dataset))


def merge_dataset(options: DataOptions, run: dict[str, Any], given: Iterable[str]) -> DataOptions:
    """``options`` with every field the run's ``dataset`` section sets and the caller did not give explicitly."""
    fields = {f.name for f in dataclasses.fields(DataOptions)}
    given = set(given)
    keep = {k: v for k, v in run.items() if k in fields and k not in given}
    return dataclasses.replace(options, **keep)

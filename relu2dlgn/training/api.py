"""``relu2dlgn.finetune(dlgn, train_loader, val_loader, teacher=model)``, ``train_classifier`` (the same loop for
a plain network), ``evaluate`` (its validation alone) and ``fresh_dlgn``."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..convert import convert
from ..dlgn import DLGN
from ..errors import InputError
from ..options import flat_fields
from .config import FinetuneConfig
from .results import FinetuneResult
from .teacher import Teacher
from .trainer import Trainer


def finetune(dlgn: DLGN, train_loader: Iterable, val_loader: Iterable | None = None, *,
             teacher: nn.Module | Teacher | None = None, epochs: int = 5, config: FinetuneConfig | None = None,
             example_inputs: Sequence[torch.Tensor] | None = None, leaf_modules: Iterable[type | str] | None = None,
             **options: Any) -> FinetuneResult:
    """Fine-tune a converted DLGN in place on a classification task.

    ``train_loader`` / ``val_loader`` yield ``(inputs, class indices)``; the model's output must be logits.
    With ``teacher`` (the source network — or a DLGN/DGN — converted into ``dlgn``), the loss is

        ``(1 - a) CE(z, y) + a T^2 KL(softmax(t/T) || softmax(z/T)) + lambda * mean_sites BCE(sigmoid(beta q), 1(q^T > 0))``

    (``a = kd_weight = 0.5``, ``T = temperature = 4``, ``lambda = gate_weight = 1``; max-pool and hardtanh
    sites use the matching cross-entropies, see :mod:`relu2dlgn.training.losses`), otherwise ``CE(z, y)``. Soft
    gates ``sigmoid(beta q)`` in training with ``beta`` annealed from ``dlgn.beta`` to three times that;
    validation with hard gates. Every :class:`FinetuneConfig` option can be passed as a keyword by its name
    (``lr=...``, ``freeze_gating=True``, ``out_dir=...``, ``resume=True``, ...), or all of them as ``config``.
    ``leaf_modules``: those to trace the teacher with (default ``None``: the DLGN's own ``dlgn.leaf_modules``,
    those it was converted with, so that the teacher is traced alike).
    A model with several outputs (a tuple or dict) needs ``logits=`` (the index or key of the logits).

    Returns a :class:`FinetuneResult` (per-epoch history, best validation accuracy, one-line summary).
    Raises :class:`~relu2dlgn.NonFiniteLossError` if the loss, a gradient or the model's state becomes NaN/inf:
    the last good checkpoint stays intact and the in-memory DLGN is put back to its last good state (see
    :class:`Trainer`). Bad loaders, labels and checkpoints raise :class:`~relu2dlgn.InputError` /
    :class:`~relu2dlgn.LoadError` naming them.

    Example::

        dlgn = relu2dlgn.convert(model)
        result = relu2dlgn.finetune(dlgn, train_loader, val_loader, teacher=model, epochs=3, out_dir="runs/x")
        result.best_val_acc, result.final["val_gate_agreement"]
    """
    if not isinstance(dlgn, DLGN):
        raise InputError(f"finetune() trains a relu2dlgn.DLGN (from relu2dlgn.convert), got {type(dlgn).__name__}; "
                         f"train a plain classifier with relu2dlgn.training.train_classifier")
    config = _config("finetune", config, epochs, options)
    trainer = Trainer(dlgn, train_loader, val_loader, teacher=teacher, config=config, example_inputs=example_inputs,
                      teacher_leaf_modules=leaf_modules)
    return trainer.fit()


def train_classifier(model: nn.Module, train_loader: Iterable, val_loader: Iterable | None = None, *,
                     epochs: int = 5, config: FinetuneConfig | None = None, **options: Any) -> FinetuneResult:
    """Train a plain classifier (e.g. the ReLU source network before it is converted) in place, with the same
    loop, options, metrics file, checkpoints and resume as :func:`finetune` — minus everything about gates.
    ``out_dir/model/model.safetensors`` receives the weights (``relu2dlgn.zoo.load_weights`` reads them).

    Example::

        model = create_model("timm:resnet10t", num_classes=10)
        result = train_classifier(model, train_loader, val_loader, epochs=8, lr=2e-3)
        result.best_val_acc
    """
    if isinstance(model, DLGN):
        raise InputError("train_classifier() trains a plain nn.Module; for a DLGN use relu2dlgn.finetune")
    config = _config("train_classifier", config, epochs, options)
    return Trainer(model, train_loader, val_loader, config=config).fit()


def evaluate(model: nn.Module, loader: Iterable, *, teacher: nn.Module | Teacher | None = None,
             example_inputs: Sequence[torch.Tensor] | None = None, **options: Any) -> dict[str, Any]:
    """The validation metrics :func:`finetune` records, for a DLGN (hard gates) or a plain classifier, without
    training: ``val_loss``, ``val_acc`` and, with a teacher (a DLGN only), ``val_gate_agreement`` and its
    per-site list. ``options`` are :class:`FinetuneConfig` options (``device``, ``amp``, ``progress``, ...)."""
    config = _config("evaluate", None, 1, {"progress": False, **options})
    trainer = Trainer(model, loader, loader, teacher=teacher, config=config, example_inputs=example_inputs)
    return trainer.evaluate()


def _config(caller: str, config: FinetuneConfig | None, epochs: int, options: dict[str, Any]) -> FinetuneConfig:
    if config is None:
        names = {leaf.name for leaf in flat_fields(FinetuneConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"{caller}() got unknown option(s) {', '.join(unknown)}; valid options: "
                            f"{', '.join(sorted(names))}")
        return FinetuneConfig.from_options(epochs=epochs, **options)
    if options:
        raise TypeError("pass either config=FinetuneConfig(...) or keyword options, not both")
    return config


def fresh_dlgn(make_model: Callable[[], nn.Module], seed: int = 0, **convert_kwargs: Any) -> DLGN:
    """A DLGN trained from scratch starts here: gating and value networks with *independent* random
    initialisations (``make_model()`` under seeds ``seed`` and ``seed + 1``), the model's own init scheme."""
    torch.manual_seed(seed)
    dlgn = convert(make_model(), **convert_kwargs)
    torch.manual_seed(seed + 1)
    other = convert(make_model(), **convert_kwargs)
    value_state = {k: v for k, v in other.state_dict().items() if k.startswith("value.")}
    dlgn.load_state_dict(value_state, strict=False)
    return dlgn


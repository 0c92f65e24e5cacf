"""What the experiments share: the data and loaders, the trained source network, fresh random inits of its
architecture, the per-run training options, and a memo of the training runs that several experiments reuse.

The source is obtained by the main job's own source step (:func:`relu2dlgn.pipeline.steps.step_source` on a
:class:`~relu2dlgn.pipeline.steps.Context`): its ``--checkpoint`` (or a run directory's trained weights) is
evaluated, otherwise the model is trained on the data with ``source_epochs`` / ``source_lr`` into
``OUT/source/``. One :class:`Setup` serves every experiment of ``relu2dlgn experiment all``, so the source is
trained once and a run that two experiments share (e.g. the converted + fine-tuned DLGN of ``dlgn_vs_dnn``,
``constant_input`` and ``npk_vs_training``) is trained once.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..convert import convert
from ..data import make_loader
from ..dlgn import DLGN, load
from ..options import flat, from_flat
from ..pipeline.config import RunConfig
from ..pipeline.steps import Context, step_source
from ..training import FinetuneConfig
from ..utils.machine import cpu_name
from ..utils.modes import eval_mode
from ..utils.threads import job_device, job_threads
from ..zoo import ModelOptions
from .config import ExperimentConfig
from .source import SourceSpec, merge_dataset, resolve_source

log = logging.getLogger(__name__)

T = TypeVar("T")


class Setup:
    """The shared ground of the experiments (see the module docstring).

    ``Setup(config, out, given=...)``: ``config`` an :class:`ExperimentConfig` (``quick`` applied here),
    ``out`` the output directory, ``given`` the option names the caller set explicitly (a run directory's data
    options fill in the others).

    It sets torch's intra-op threads for the process: ``threads``, or 1 when training on the CPU (measured on
    the 2-core machine shared with other jobs: two threads made the experiments about 4x slower than one).
    """

    def __init__(self, config: ExperimentConfig, out: str, *, given: Iterable[str] = ()):
        self.cfg = cfg = config.effective()
        self.out = out
        threads = job_threads(cfg.threads, self.device)
        if threads:
            torch.set_num_threads(threads)
        model = cfg.source.model or ""
        self.spec: SourceSpec = resolve_source(model, cfg.source.checkpoint)
        dataset = merge_dataset(cfg.dataset, self.spec.dataset, given)
        run_cfg = RunConfig(name="experiments", out=out,
                            source=ModelOptions(model=self.spec.model, checkpoint=self.spec.weights),
                            source_training=cfg.source_training, dataset=dataset, training=cfg.training)
        self.dataset = dataset
        self.ctx = Context(run_cfg, resuming=False)
        self.data = self.ctx.data
        self.example = self.ctx.example
        self.val_loader = self.ctx.val_loader
        self.train_loader = self._train_loader()
        self._source_record: dict[str, Any] | None = None
        self._memo: dict[Any, Any] = {}
        self.npk_wanted = False  # set by npk_vs_training (or run_all): shared DLGN runs then record NPK curves
        self.started = time.perf_counter()

    # -- data ------------------------------------------------------------------------------------------
    def _train_loader(self) -> DataLoader:
        n = self.cfg.train_examples
        if n is None or n >= len(self.data.train):
            return self.ctx.train_loader
        d = self.dataset
        return make_loader(Subset(self.data.train, range(n)), d.batch_size, train=True, workers=d.workers or 0,
                           seed=self.cfg.base_seed)

    def data_protocol(self) -> str:
        """The data split, in words, for the protocol tables."""
        n_train = len(self.train_loader.dataset)  # type: ignore[arg-type]
        return (f"{self.data.name} at {self.data.image_size}px x {self.data.in_chans} ch: train on {n_train} "
                f"examples (batch {self.dataset.batch_size}, augmented), accuracy on the {len(self.data.val)} "
                f"validation examples (hard gates)")

    # -- the source ------------------------------------------------------------------------------------
    def source_record(self) -> dict[str, Any]:
        """The main job's source step, once: ``{"trained_here", "accuracy", "weights", ...}``."""
        if self._source_record is None:
            tick = time.perf_counter()
            self._source_record = step_source(self.ctx)
            self._source_record["seconds"] = time.perf_counter() - tick
            log.info("source network %s: validation accuracy %.4f (%s)", self.spec.model,
                     self._source_record["accuracy"], "trained here" if self._source_record["trained_here"]
                     else self._source_record["weights"])
        return self._source_record

    @property
    def source(self) -> nn.Module:
        """The trained source network (eval mode)."""
        self.source_record()
        return self.ctx.source.eval()

    @property
    def source_accuracy(self) -> float:
        return float(self.source_record()["accuracy"])

    def source_protocol(self) -> str:
        r = self.source_record()
        how = f"trained here for {r.get('epochs')} epoch(s) (lr {self.cfg.source_training.source_lr})" \
            if r["trained_here"] else f"weights {r['weights']}"
        return f"{self.spec.model}, {how}"

    def make_model(self) -> nn.Module:
        """A fresh random initialisation of the source architecture (the model's own init scheme, global RNG)."""
        return self.ctx.build_source(None)

    def fresh_model(self, seed: int) -> nn.Module:
        """:meth:`make_model` under ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        return self.make_model()

    def convert(self, model: nn.Module, **kwargs: Any) -> DLGN:
        """``relu2dlgn.convert(model, example_inputs=<two validation images>, **kwargs)``."""
        with eval_mode(model):
            dlgn = convert(model.cpu(), example_inputs=self.example, **kwargs)
        return dlgn.eval()

    def run_dlgn(self) -> DLGN | None:
        """The run directory's fine-tuned DLGN (``model/``), or ``None``."""
        if self.spec.dlgn_dir is None:
            return None
        return self.memo(("run dlgn",), lambda: load(self.spec.dlgn_dir).eval())

    # -- training ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return job_device(self.cfg.training.runtime.device)

    def training(self, seed: int, **options: Any) -> FinetuneConfig:
        """The fine-tuning options of one run: the experiments' ``training`` options with ``seed`` and the
        run's own settings (``freeze_gating=True``, ``distill=False``, ...)."""
        return from_flat(FinetuneConfig, self.cfg.training, what="finetune option", seed=seed, **options)

    def run_dir(self, tag: str) -> str:
        return os.path.join(self.out, "runs", tag)

    def memo(self, key: Any, make: Callable[[], T]) -> T:
        """``make()`` once per ``key`` for the lifetime of this setup."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def memoised(self, key: Any) -> Any:
        """What :meth:`memo` holds under ``key`` (``None`` if nothing)."""
        return self._memo.get(key)

    def remember(self, key: Any, value: Any) -> None:
        """Hold ``value`` under ``key`` (replacing what was there)."""
        self._memo[key] = value

    def machine(self) -> dict[str, Any]:
        """CPU, threads, device and load average (for the tables; timings move with the load)."""
        info: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "device": str(self.device), "torch": torch.__version__}
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        try:
            info["load_average"] = [round(v, 2) for v in os.getloadavg()]
        except OSError:  # pragma: no cover - not on every platform
            pass
        return info


def config_from(model: str | None = None, config: ExperimentConfig | None = None,
                **options: Any) -> tuple[ExperimentConfig, set[str]]:
    """The :class:`ExperimentConfig` of a Python call (``model`` and leaf options by name on ``config`` or the
    defaults) and the names given explicitly."""
    values = dict(options)
    if model is not None:
        values["model"] = model
    cfg = from_flat(ExperimentConfig, config, what="experiment option", **values)
    given = set(values) if config is None else set(values) | _non_default(config)
    return cfg, given


def _non_default(config: ExperimentConfig) -> set[str]:
    """The options of ``config`` that differ from the defaults (what a ``config=`` caller set)."""
    a, b = flat(config), flat(ExperimentConfig())
    return {k for k in a if a[k] != b[k]}

"""The training loop: :class:`Trainer` (the objective is in :mod:`relu2dlgn.training.losses`; what it trains — a
DLGN, or a plain classifier such as the source network — is adapted by :mod:`relu2dlgn.training.student`)."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..dlgn import DLGN
from ..errors import InputError, OptionError
from ..options import to_dict, validate
from ..utils.memory import retain_freed_memory
from ..utils.threads import job_device
from .batches import EMPTY_VAL, check_loaders, split_batch, to_device
from .checkpoint import MODEL_DIR, latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import FinetuneConfig
from .distributed import (all_gather_objects, all_reduce_sum, barrier, distributed_loader, is_distributed,
                          rank_and_world)
from .bn import recalibrate_bn
from .guard import StepGuard, non_finite_loss
from .losses import Objective, select_logits
from .metrics import EpochSums, MetricsFile, format_record, summary_line
from .optim import grad_norm, group_lrs, make_optimizer, make_scheduler
from .results import FinetuneResult
from .rng import rng_state, seed_all, set_rng_state
from .schedules import beta_at
from .student import DLGNStudent, StepModule, as_student
from .teacher import Teacher, make_teacher, match_sites

log = logging.getLogger(__name__)


class Trainer:
    """Trains a :class:`~relu2dlgn.DLGN` (or a plain classifier) in place. ``Trainer(dlgn, train_loader,
    val_loader, teacher=model, config=FinetuneConfig(...)).fit()``; see :func:`relu2dlgn.finetune` for the
    objective and the files. A plain ``nn.Module`` classifier (no gates: the gate options and the gate
    agreement do not apply) is trained with the same loop, checkpoints and files; see
    :func:`relu2dlgn.training.train_classifier`.

    Under ``torchrun`` (a process group initialised, e.g. by :func:`~relu2dlgn.training.init_distributed`) the
    model is wrapped in ``DistributedDataParallel``; loaders without a ``DistributedSampler`` get one (their
    ``batch_size`` is per process); metrics are reduced over all processes and only rank 0 writes files.
    ``teacher_leaf_modules``: the ``leaf_modules`` to trace the teacher with (default: those the DLGN was
    converted with, ``dlgn.leaf_modules``).

    Failures: a NaN/inf loss, gradient (before the update) or model state (at the end of an epoch, before
    validation and the checkpoint) raises :class:`~relu2dlgn.NonFiniteLossError` with the in-memory model put
    back to its last good state (:mod:`.guard`); empty loaders, ambiguous outputs and checkpoints that do not
    fit raise :class:`~relu2dlgn.InputError` / :class:`~relu2dlgn.LoadError` naming them.
    """

    def __init__(self, dlgn: DLGN | nn.Module, train_loader: Iterable, val_loader: Iterable | None = None, *,
                 teacher: nn.Module | Teacher | None = None, config: FinetuneConfig | None = None,
                 example_inputs: Sequence[torch.Tensor] | None = None,
                 teacher_leaf_modules: Iterable[type | str] | None = None):
        self.cfg = cfg = config or FinetuneConfig()
        validate(cfg, what="finetune option")
        self.student = as_student(dlgn)
        self.model = dlgn = self.student.module
        self.distributed = is_distributed()
        self.rank, self.world = rank_and_world()
        self.main = self.rank == 0
        self.device = self._pick_device()
        self._setup_loaders(train_loader, val_loader)
        rt = cfg.runtime
        self.amp = rt.amp if rt.amp is not None else self.device.type == "cuda"
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        self.channels_last = rt.channels_last if rt.channels_last is not None else \
            (self.device.type == "cuda" and has_conv)
        if rt.retain_memory or (rt.retain_memory is None and self.device.type == "cpu"):
            retain_freed_memory()
        dlgn.to(self.device)
        if self.channels_last:
            dlgn.to(memory_format=torch.channels_last)
        self._setup_teacher(teacher, example_inputs, teacher_leaf_modules)
        self._setup_optimisation()
        self.guard = StepGuard(dlgn)  # after the move to the device: it holds the buffers' current tensors
        self.metrics = MetricsFile(cfg.output.out_dir if self.main else None)
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    # -- setup ------------------------------------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        dev = job_device(self.cfg.runtime.device)
        if self.distributed and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return dev

    def _setup_loaders(self, train_loader: Iterable, val_loader: Iterable | None) -> None:
        if self.distributed and isinstance(train_loader, DataLoader):
            train_loader = distributed_loader(train_loader, train=True, seed=self.cfg.output.seed or 0)
            if isinstance(val_loader, DataLoader):
                val_loader = distributed_loader(val_loader, train=False, seed=0)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.steps_per_epoch = check_loaders(train_loader, val_loader)
        self.total_steps = self.cfg.epochs * self.steps_per_epoch

    def _setup_teacher(self, teacher: Any, example_inputs: Sequence[torch.Tensor] | None,
                       leaf_modules: Iterable[type | str] | None) -> None:
        d = self.cfg.distillation
        self.distill = d.distill if d.distill is not None else teacher is not None
        if self.distill and teacher is None:
            raise OptionError("finetune option distill=True needs a teacher (the source network)")
        self.teacher: Teacher | None = None
        self.pairs: list[tuple[int, int]] = []
        if teacher is not None:
            if isinstance(teacher, nn.Module):
                teacher = teacher.to(self.device)
                if self.channels_last:
                    teacher.to(memory_format=torch.channels_last)
            examples = tuple(to_device(e, self.device) for e in example_inputs) if example_inputs else None
            leaves = getattr(self.model, "leaf_modules", ()) if leaf_modules is None else leaf_modules
            self.teacher = make_teacher(teacher, examples, leaves, targets=True)
            if not isinstance(self.student, DLGNStudent):
                raise InputError("a teacher's gates can only teach a DLGN; for a plain classifier use distill=False "
                                 "and no teacher")
            self.pairs = match_sites(self.model, self.teacher.site_nodes, self.teacher.site_kinds)
        self.use_kd = self.distill and d.kd_weight > 0
        self.use_gate_loss = self.distill and d.gate_weight > 0 and not self.cfg.gates.freeze_gating
        self.objective = Objective(self.student.sites, self.student.gate_specs, self.pairs, d,
                                   label_smoothing=self.cfg.optim.label_smoothing, use_kd=self.use_kd,
                                   use_gate_loss=self.use_gate_loss)

    def _setup_optimisation(self) -> None:
        cfg, networks = self.cfg, self.student.networks
        self.frozen = {name for name in ("gating", "value") if getattr(cfg.gates, f"freeze_{name}")}
        missing = self.frozen - set(networks)
        if missing:
            raise OptionError(f"finetune option freeze_{min(missing)}=True: {type(self.model).__name__} has no "
                              f"{min(missing)} network")
        for name, net in networks.items():
            for p in net.parameters():
                p.requires_grad_(name not in self.frozen)
        self.optimizer = make_optimizer(networks, cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, cfg.optim.warmup_fraction)
        g = cfg.gates
        beta = self.student.beta
        self.beta_start = g.beta_start if g.beta_start is not None else beta
        self.beta_end = g.beta_end if g.beta_end is not None else (3.0 * beta if beta is not None else None)
        if g.beta_schedule == "constant":
            self.beta_end = self.beta_start
        self.step_module: nn.Module = StepModule(self.student, g.freeze_gating)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DDP(self.step_module, device_ids=ids)
        if cfg.runtime.compile:
            self.step_module = torch.compile(self.step_module)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_train_mode(self) -> None:
        self.model.train()
        for name in self.frozen:
            self.student.networks[name].eval()

    def _inputs(self, batch: Any) -> tuple[tuple[Any, ...], torch.Tensor]:
        inputs, y = split_batch(batch)
        inputs = tuple(to_device(x, self.device, self.channels_last) for x in inputs)
        return inputs, y.to(self.device, non_blocking=True)

    # -- one step ---------------------------------------------------------------------------------------
    def _train_step(self, inputs: tuple[Any, ...], y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        with self._autocast():
            t_logits, t_qs = None, None
            if self.teacher is not None and (self.use_kd or self.use_gate_loss):
                with torch.no_grad():
                    t_out, t_qs = self.teacher(*inputs)
                    t_logits = select_logits(t_out, self.cfg.logits, "the teacher")
            beta = self.student.beta or 1.0
            # compiled: a tensor, so that a new beta does not recompile
            step_beta = torch.tensor(beta, dtype=torch.float32, device=self.device) if self.cfg.runtime.compile \
                else beta
            out, qs, gates = self.step_module(step_beta, *inputs)
            logits = select_logits(out, self.cfg.logits)
            loss, parts = self.objective(logits, y, qs, t_logits, t_qs, beta, gates)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, parts, logits

    # -- one epoch --------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training loader; returns the epoch's training metrics (reduced over processes)."""
        self._set_train_mode()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums = EpochSums(len(self.pairs), self.device)
        bar = self._bar(self.train_loader, f"epoch {epoch}/{self.cfg.epochs}", self.steps_per_epoch)
        t0 = time.perf_counter()
        for i, batch in enumerate(bar):
            if self.beta_start is not None:
                self.student.beta = beta_at(self.step, self.total_steps, self.beta_start, self.beta_end,
                                            self.cfg.gates.beta_schedule)
            inputs, y = self._inputs(batch)
            self.guard.snapshot_step()
            loss, parts, logits = self._train_step(inputs, y)
            norm = grad_norm(params, self.cfg.optim.max_grad_norm)
            bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)).float()
            if all_reduce_sum(bad).item():
                self._non_finite(epoch, i, loss, norm, self.guard.restore_step())
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            sums.add(parts, logits, y)
            if "agree" in parts:
                sums.add_agreement(parts["agree"], parts["decisions"])
            if self.main and self.cfg.runtime.progress and i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", **({"beta": f"{self.student.beta:.3g}"}
                                                            if self.student.beta is not None else {}))
        elapsed = time.perf_counter() - t0
        sums.reduce()
        rec: dict[str, Any] = {"train_loss": sums.mean("loss"), "train_ce": sums.mean("ce")}
        if self.use_kd:
            rec["train_kd"] = sums.mean("kd")
        if self.use_gate_loss:
            rec["train_gate_loss"] = sums.mean("gate")
        rec["train_acc"] = sums.accuracy()
        agreement = sums.agreement()
        if self.pairs and agreement is not None:  # the teacher ran in training (distillation)
            rec["train_gate_agreement"] = agreement
        rec["throughput"] = sums.count / elapsed
        rec["epoch_time"] = elapsed
        return rec

    def _non_finite(self, epoch: int, i: int, loss: torch.Tensor, norm: torch.Tensor, restored: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise non_finite_loss(f"at epoch {epoch}, batch {i + 1}/{self.steps_per_epoch} (global step {self.step + 1})",
                              loss, norm, self.student.beta, restored, self._newest_checkpoint())

    def _newest_checkpoint(self) -> str | None:
        return latest_checkpoint(self.cfg.output.out_dir) if self.cfg.output.out_dir else None

    @torch.no_grad()
    def evaluate(self, loader: Iterable | None = None) -> dict[str, Any]:
        """Validation with hard gates (``dlgn.eval()``): loss, accuracy and, with a teacher, the gate agreement
        overall and per site. Leaves the DLGN in eval mode. :class:`InputError` if the loader yields nothing."""
        loader = self.val_loader if loader is None else loader
        if loader is None:
            return {}
        self.model.eval()
        sums = EpochSums(len(self.pairs), self.device)
        for batch in self._bar(loader, "validate", None, leave=False):
            inputs, y = self._inputs(batch)
            with self._autocast():
                out, qs, _ = self.student.forward(inputs, hard=True)
                logits = select_logits(out, self.cfg.logits).float()
                if self.teacher is not None and self.pairs:
                    _, t_qs = self.teacher(*inputs)
                    agreement = self.objective.agreement(
                        self.objective.site_terms(qs, t_qs, 1.0, loss=False), self.device)
                    sums.add_agreement(agreement["agree"].double(), agreement["decisions"])
            sums.add({"loss": F.cross_entropy(logits, y)}, logits, y)
        sums.reduce()
        if sums.count == 0:
            raise InputError(EMPTY_VAL)
        rec: dict[str, Any] = {"val_loss": sums.mean("loss"), "val_acc": sums.accuracy()}
        if self.teacher is not None and self.pairs:
            rec["val_gate_agreement"] = sums.agreement() or 0.0
            rec["val_gate_agreement_per_site"] = sums.agreement_per_site()
        return rec

    def _bar(self, it: Iterable, desc: str, total: int | None, leave: bool = True) -> Any:
        from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on the loader an extra time
        return tqdm(it, desc=desc, total=total, leave=leave, dynamic_ncols=True,
                    disable=not (self.cfg.runtime.progress and self.main))

    # -- checkpoints ------------------------------------------------------------------------------------
    def _loader_generator(self) -> torch.Generator | None:
        """The training loader's own shuffling generator (``DataLoader(..., generator=g)``), if it has one:
        its state is part of the random streams a resumed run must continue."""
        gen = getattr(self.train_loader, "generator", None)
        return gen if isinstance(gen, torch.Generator) else None

    def _trainer_state(self) -> dict[str, Any]:
        rngs = all_gather_objects(rng_state(self._loader_generator()))  # collective: every rank calls it
        return {"epoch": self.epoch, "step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "beta": self.student.beta,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "history": self.history,
                "rng": rngs, "world_size": self.world, "config": to_dict(self.cfg)}

    def save_checkpoint(self) -> str | None:
        """Checkpoint the epoch just finished (rank 0 writes; every process waits for it)."""
        state = self._trainer_state()
        path = None
        out_dir = self.cfg.output.out_dir
        if self.main and out_dir:
            path = save_checkpoint(out_dir, self.epoch, self.model.state_dict(), state,
                                   self.cfg.output.keep_checkpoints)
        barrier()
        return path

    def resume(self) -> None:
        """Load the newest checkpoint of ``out_dir``: weights, optimiser, schedule, step, beta, history, RNG."""
        out_dir = self.cfg.output.out_dir
        assert out_dir
        path = latest_checkpoint(out_dir)
        if path is None:
            raise InputError(f"resume: no checkpoint under '{os.path.join(out_dir, 'checkpoints')}' "
                             f"(run without resume to start)")
        state = restore_checkpoint(path, self.model, self.optimizer, self.scheduler, self.device)
        self.epoch, self.step = state["epoch"], state["step"]
        self.beta_start, self.beta_end = state["beta_start"], state["beta_end"]
        if state["beta"] is not None:
            self.student.beta = state["beta"]
        self.history = list(state["history"])
        rngs = state["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank], self._loader_generator())
        elif self.main:
            log.warning("checkpoint was written by %d process(es), now %d: the random streams restart (training "
                        "continues, not bit-for-bit)", len(rngs), self.world)
        self.metrics.rewrite(self.history)
        self.guard.keep_good_state(self.epoch)

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> FinetuneResult:
        """Train for ``config.epochs`` epochs (from the last checkpoint with ``resume``)."""
        cfg = self.cfg
        if cfg.output.out_dir and self.main:
            os.makedirs(cfg.output.out_dir, exist_ok=True)
        if cfg.output.resume:
            self.resume()
        else:
            self._start()
        start = time.perf_counter()
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            lrs = group_lrs(self.optimizer)
            rec = {"epoch": epoch, **self.train_epoch(epoch)}
            self.guard.check_state(f"after epoch {epoch}", self._newest_checkpoint())
            rec.update(self.evaluate())
            rec.update({"step": self.step, **self._beta_record(), **lrs})
            self.epoch = epoch
            self._record(rec)
            self.save_checkpoint()
            self.guard.keep_good_state(epoch)
        elapsed = time.perf_counter() - start
        self.guard.check_state("at the end of training", self._newest_checkpoint())
        self.model.eval()
        model_dir = os.path.join(cfg.output.out_dir, MODEL_DIR) if cfg.output.out_dir else None
        if model_dir and self.main:
            self.student.save(model_dir)
        barrier()
        summary = summary_line(self.history, self.epoch, self.step, elapsed, model_dir)
        if self.main:
            log.info(summary)
        return FinetuneResult.of(self.history, cfg.output.out_dir, summary)

    def _start(self) -> None:
        """A fresh run: seeds, an empty metrics file, batch-norm re-estimation, the epoch-0 evaluation."""
        cfg = self.cfg
        if cfg.output.seed is not None:
            seed_all(cfg.output.seed + self.rank)
        self.metrics.rewrite([])
        unfrozen = [n for n in self.student.networks if n not in self.frozen]
        if cfg.gates.recalibrate_bn and isinstance(self.student, DLGNStudent):
            recalibrate_bn(self.model, self.train_loader, cfg.gates.recalibrate_bn, self.device, unfrozen)
        if cfg.output.eval_before and self.val_loader is not None:
            self._record({"epoch": 0, "step": 0, **self.evaluate(), **self._beta_record()})
        self.guard.keep_good_state(0)

    def _beta_record(self) -> dict[str, float]:
        return {"beta": self.student.beta} if self.student.beta is not None else {}

    def _record(self, rec: dict[str, Any]) -> None:
        rec["time"] = time.time()
        self.history.append(rec)
        if self.main:
            self.metrics.append(rec)
            log.info(format_record(rec))

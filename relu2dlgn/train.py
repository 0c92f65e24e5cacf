"""Fine-tuning a converted DLGN: ``relu2dlgn.finetune(dlgn, train_loader, val_loader, teacher=model)``.

The training objective, for a batch with labels ``y``, DLGN logits ``z`` (soft gates ``sigmoid(beta q)``) and,
when a teacher (the source network) is given, its logits ``t`` and its pre-activations ``q^T``::

    L = (1 - a) CE(z, y) + a T^2 KL(softmax(t / T) || softmax(z / T))          (logit distillation, "kd")
        + lambda * mean_i  L_gate,i                                               (gate agreement)

    L_gate,i = mean BCE(sigmoid(beta q_i), 1(q^T_i > 0))                          relu / leaky_relu / prelu
             = mean over both thresholds of BCE(sigmoid(beta (q_i - c)), 1(q^T_i > c)), c in {lo, hi}
                                                                                  hardtanh / relu6
             = mean CE(softmax over the window of beta q_i, arg max of q^T_i)     max-pool

so each site's soft gates are pulled towards the source network's own on/off pattern, every site weighted
equally.  Without a teacher ``L = CE(z, y)``.  ``beta`` follows a schedule (constant, or annealed
geometrically/linearly upward so soft gates approach the hard gates used at evaluation), validation always
runs with hard gates (``dlgn.eval()``), and *gate agreement* — the fraction of gate decisions (on/off, the
linear piece, the max-pool arg max) where the DLGN's hard gates equal the teacher's — is reported per epoch.

Everything is in :class:`Trainer`; :func:`finetune` is the one-call front end and
:func:`add_finetune_parser` / :func:`cmd_finetune` the ``relu2dlgn finetune`` command.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .dlgn import DLGN
from .errors import InputError, NonFiniteLossError, Relu2DlgnError
from .gates import GateSpec, pool_windows

CHECKPOINT_DIR, LATEST, METRICS, MODEL_DIR = "checkpoints", "latest.json", "metrics.jsonl", "model"
WEIGHTS_FILE, STATE_FILE = "model.safetensors", "trainer.pt"




# --------------------------------------------------------------------------------------------------
# configuration and result
# --------------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """Every knob of :class:`Trainer`. The defaults are the recommended setting; see ``docs/finetune.md``.

    Optimisation: ``optimizer`` ``"adamw"`` or ``"sgd"`` (momentum 0.9, Nesterov); ``lr`` / ``weight_decay``
    for both networks unless ``gating_lr`` / ``value_lr`` / ``gating_weight_decay`` / ``value_weight_decay``
    are set (biases and norm parameters get no weight decay); linear warm-up over ``warmup_fraction`` of the
    steps, then cosine decay to 0; ``max_grad_norm`` clips the global gradient norm (``None``: no clipping).

    Gates: ``beta_start`` (default: ``dlgn.beta``) to ``beta_end`` (default ``beta_start * 3``) along
    ``beta_schedule`` (``"constant"``, ``"geometric"``, ``"linear"``), per step. ``freeze_gating`` keeps the
    gating network fixed (its weights *and* batch-norm statistics; the value network then trains with the hard
    gates — the papers' "fixed learnt gates"); ``freeze_value`` the value network.

    Distillation (needs ``teacher``): ``distill`` (``None``: on when a teacher is given) switches both terms;
    ``kd_weight`` is ``a`` and ``temperature`` is ``T`` of the logit term (``kd_weight=0`` turns it off);
    ``gate_weight`` is ``lambda`` of the gate-agreement term (0 turns it off).

    Runtime: ``device`` (``None``: CUDA when present, else CPU); ``amp`` (``None``: bf16 autocast on CUDA);
    ``channels_last`` (``None``: on CUDA for conv nets); ``compile`` wraps the step in ``torch.compile``.

    Bookkeeping: ``out_dir`` receives ``metrics.jsonl`` (one JSON line per epoch), ``checkpoints/`` (every
    epoch, atomically; the newest ``keep_checkpoints`` kept) and ``model/`` (the final DLGN, loadable with
    ``relu2dlgn.load``); ``resume`` continues from its newest checkpoint.  ``seed`` seeds torch, ``random``
    and numpy at the start of a fresh run (each process adds its rank; ``None`` leaves them alone).
    ``recalibrate_bn`` re-estimates batch-norm statistics with hard gates on that many training batches
    before training (conversion leaves the gating network's statistics those of the source network);
    ``eval_before`` records the validation metrics before training as epoch 0.
    """

    epochs: int = 5
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    gating_lr: float | None = None
    value_lr: float | None = None
    gating_weight_decay: float | None = None
    value_weight_decay: float | None = None
    warmup_fraction: float = 0.05
    max_grad_norm: float | None = None
    label_smoothing: float = 0.0
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str = "geometric"
    freeze_gating: bool = False
    freeze_value: bool = False
    distill: bool | None = None
    kd_weight: float = 0.5
    temperature: float = 4.0
    gate_weight: float = 1.0
    device: str | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    out_dir: str | None = None
    resume: bool = False
    keep_checkpoints: int = 2
    seed: int | None = 0
    recalibrate_bn: int = 20
    eval_before: bool = True
    progress: bool = True
    verbose: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option and the accepted values."""
        def bad(name: str, want: str) -> None:
            raise ValueError(f"finetune option {name}={getattr(self, name)!r}: {want}")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            bad("epochs", "must be an integer >= 1")
        if self.optimizer not in ("adamw", "sgd"):
            bad("optimizer", "must be 'adamw' or 'sgd'")
        for name in ("lr", "gating_lr", "value_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                bad(name, "must be a finite number > 0")
        for name in ("weight_decay", "gating_weight_decay", "value_weight_decay", "gate_weight",
                     "label_smoothing"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                bad(name, "must be a finite number >= 0")
        if not 0 <= self.warmup_fraction < 1:
            bad("warmup_fraction", "must be in [0, 1)")
        if not 0 <= self.kd_weight <= 1:
            bad("kd_weight", "must be in [0, 1]")
        if not self.temperature > 0:
            bad("temperature", "must be > 0")
        if self.beta_schedule not in ("constant", "geometric", "linear"):
            bad("beta_schedule", "must be 'constant', 'geometric' or 'linear'")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                bad(name, "must be a finite number > 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad("max_grad_norm", "must be > 0 or None")
        if self.freeze_gating and self.freeze_value:
            bad("freeze_value", "cannot freeze both the gating and the value network (nothing would train)")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        if self.recalibrate_bn < 0:
            bad("recalibrate_bn", "must be >= 0 (batches)")
        if self.resume and not self.out_dir:
            bad("resume", "needs out_dir (where the checkpoints are)")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns. ``history`` holds the per-epoch records also written to metrics.jsonl."""

    history: list[dict[str, Any]]
    best_val_acc: float | None
    best_epoch: int | None
    out_dir: str | None
    summary: str

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# --------------------------------------------------------------------------------------------------
# the teacher: source output and pre-activations in one pass
# --------------------------------------------------------------------------------------------------

class TeacherTap(nn.Module):
    """The source network, returning ``(output, (q_0, ..., q_{n-1}))``: its output and the pre-activation at
    every gate site, in one forward pass (a DGN's gating graph would give the ``q_i`` but not the output).

    ``site_nodes[i]`` is the source-graph node name of site ``i`` — the same names a DLGN converted from the
    same architecture has in ``dlgn.sites[j].node``, which is how sites are matched.
    """

    def __init__(self, model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None,
                 leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        from .capture import capture
        from .rewrite import alias_analysis, drop_needless_clones
        from .sites import find_sites

        cap = capture(model, example_inputs, leaf_modules)
        sites, _ = find_sites(cap.graph, cap.modules)
        g = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        out = g.graph_copy(cap.graph, val_map)
        captures = []
        for node, c in sites:
            with g.inserting_before(val_map[node]):
                captures.append(g.call_method("clone", (val_map[c.input],)))
        g.output((out, tuple(captures)))
        drop_needless_clones(g, captures, cap.modules)
        group, mutations = alias_analysis(g, cap.modules)
        inputs = {group[n] for n in g.nodes if n.op == "placeholder"}
        # a source whose first ops work in place on its input would change the batch the DLGN then sees
        self.mutates_input = any(grp in inputs for _, grp in mutations)
        targets = {n.target for n in g.nodes if n.op in ("call_module", "get_attr")}
        self.graph_module = fx.GraphModule({t: cap.modules[t] for t in targets}, g, class_name="TeacherTap")
        self.site_nodes = [node.name for node, _ in sites]
        self.site_kinds = [c.kind for _, c in sites]
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
        if self.mutates_input:
            inputs = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
        out, qs = self.graph_module(*inputs)
        return out, tuple(qs)


class _DLGNTeacher(nn.Module):
    """A DLGN (or DGN) used as teacher: its hard-gate output and its gating pre-activations."""

    def __init__(self, dlgn: DLGN):
        super().__init__()
        self.dlgn = dlgn
        self.site_nodes = [s.node for s in dlgn.sites]
        self.site_kinds = [s.kind for s in dlgn.sites]
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
        return forward_with_preactivations(self.dlgn, inputs, hard=True)


def match_sites(dlgn: DLGN, teacher_nodes: Sequence[str], teacher_kinds: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs ``(dlgn site index, teacher site index)`` matched by source node name; every DLGN site must have
    a teacher site of the same kind (a DLGN converted with ``pool="avg"`` simply has no max-pool sites)."""
    where = {n: i for i, n in enumerate(teacher_nodes)}
    pairs, missing = [], []
    for site in dlgn.sites:
        j = where.get(site.node)
        if j is None or teacher_kinds[j] != site.kind:
            missing.append(f"site {site.index} ({site.kind} '{site.node}' at {site.module_path or '<root>'})")
        else:
            pairs.append((site.index, j))
    if missing:
        raise InputError(
            f"the teacher's gate sites do not match the DLGN's: {len(missing)} DLGN site(s) have no teacher site "
            f"of the same name and kind: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. The "
            f"teacher has {len(teacher_nodes)} sites ({', '.join(teacher_nodes[:6])}{' ...' if len(teacher_nodes) > 6 else ''}). "
            f"Pass the model the DLGN was converted from (same architecture, same leaf_modules).")
    return pairs


def make_teacher(teacher: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None,
                 leaf_modules: Iterable[type | str] = ()) -> nn.Module:
    """Wrap a source network (or a DLGN/DGN) so that calling it returns ``(output, pre-activations)``."""
    if isinstance(teacher, (TeacherTap, _DLGNTeacher)):
        return teacher
    if isinstance(teacher, DLGN):
        return _DLGNTeacher(teacher)
    if not isinstance(teacher, nn.Module):
        raise InputError(f"teacher must be an nn.Module (the source network), got {type(teacher).__name__}")
    return TeacherTap(teacher, example_inputs, leaf_modules)


# --------------------------------------------------------------------------------------------------
# losses and gate statistics
# --------------------------------------------------------------------------------------------------

def forward_with_preactivations(dlgn: DLGN, inputs: Sequence[Any], *, hard: bool,
                                beta: float | torch.Tensor | None = None) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """``(dlgn output, pre-activations)`` with soft (``hard=False``) or hard gates, whatever the module mode."""
    r = dlgn.run(*inputs, hard=hard, beta=beta)
    return r.output, r.pre_activations


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def site_gate_terms(spec: GateSpec, q: torch.Tensor, q_teacher: torch.Tensor, beta: float, *,
                    loss: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """One site's gate-agreement loss and agreement count against the teacher's pre-activation ``q^T``.

    Loss (see the module docstring): the BCE of the soft gates ``sigmoid(beta (q - c))`` against the teacher's
    0/1 pattern ``1(q^T > c)`` for each threshold ``c`` of the site (0 for the ReLU family; lo and hi for
    hardtanh), or for max-pool the cross-entropy of each window's soft-max ``softmax(beta q)`` against the
    window's teacher arg max.  Agreement: the number of hard gate decisions that equal the teacher's (on/off,
    the linear piece for hardtanh, the arg max for max-pool) and the number of decisions.

    Returns ``(loss or None, agreeing decisions, decisions)``.
    """
    q, qt = q.float(), q_teacher.float()
    if spec.kind in ("relu", "leaky_relu", "prelu", "hardtanh"):
        if spec.kind == "hardtanh":
            z, target = torch.stack([q - spec.lo, q - spec.hi]), torch.stack([qt > spec.lo, qt > spec.hi])
            agree = ((z > 0) == target).all(0)
        else:
            z, target = q, qt > 0
            agree = (z > 0) == target
        value = F.binary_cross_entropy_with_logits(beta * z, target.float()) if loss else None
        return value, agree.sum(), agree.numel()
    if spec.kind == "maxpool":
        geo = spec.pool
        assert geo is not None
        windows, t_windows = pool_windows(q, geo, -math.inf), pool_windows(qt, geo, -math.inf)  # (N, C, K, *O)
        # max(...).indices: the first maximum like argmax, but several times faster over a non-trailing axis
        target = t_windows.max(2).indices
        agree = windows.detach().max(2).indices == target
        value = None
        if loss:
            value = F.cross_entropy((windows * beta).flatten(0, 1), target.flatten(0, 1))
        return value, agree.sum(), agree.numel()
    raise ValueError(f"unknown gate kind {spec.kind!r}")


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------

def beta_at(step: int, total: int, start: float, end: float, schedule: str) -> float:
    """Soft-gate sharpness at optimiser step ``step`` of ``total``: ``start`` → ``end`` along ``schedule``."""
    if schedule == "constant" or total <= 1:
        return start
    f = min(max(step / (total - 1), 0.0), 1.0)
    if schedule == "geometric":
        return start * (end / start) ** f
    return start + (end - start) * f


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    f = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(f, 1.0)))


# --------------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------------

def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed() -> tuple[int, int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU.

    Returns ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` when not launched by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), local


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist():
        dist.all_reduce(t)
    return t


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def distributed_loader(loader: DataLoader, *, train: bool, seed: int) -> DataLoader:
    """The same loader with a ``DistributedSampler`` (training) or a disjoint shard (evaluation), unless it
    already has one; ``batch_size`` stays per process."""
    from torch.utils.data.distributed import DistributedSampler

    from .data import ShardSampler

    if isinstance(loader.sampler, (DistributedSampler, ShardSampler)) or loader.batch_size is None:
        if loader.batch_size is None:
            raise InputError("distributed training needs DataLoaders with a batch_size (not a batch_sampler)")
        return loader
    shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
    rank, world = dist.get_rank(), dist.get_world_size()
    if train:
        sampler: Any = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                          drop_last=loader.drop_last)
    else:
        sampler = ShardSampler(len(loader.dataset), rank, world)  # type: ignore[arg-type]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)


# --------------------------------------------------------------------------------------------------
# files: atomic writes, checkpoints
# --------------------------------------------------------------------------------------------------

def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name in the same directory, then ``os.replace`` it."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=d)
    os.close(fd)
    try:
        _fsync_write(tmp, text.encode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint directory under ``out_dir`` (``None`` if there is none)."""
    pointer = os.path.join(out_dir, CHECKPOINT_DIR, LATEST)
    if not os.path.exists(pointer):
        return None
    try:
        with open(pointer) as f:
            name = json.load(f)["dir"]
    except (OSError, ValueError, KeyError) as exc:
        raise Relu2DlgnError(f"{pointer}: unreadable checkpoint pointer ({exc})") from None
    path = os.path.join(out_dir, CHECKPOINT_DIR, name)
    if not os.path.isdir(path):
        raise Relu2DlgnError(f"{pointer} names '{name}', which does not exist under {os.path.dirname(pointer)}")
    return path


def save_checkpoint(out_dir: str, epoch: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int) -> str:
    """Write ``checkpoints/epoch-NNNN/{model.safetensors, trainer.pt}`` atomically: both files go into a
    temporary directory that is renamed into place, then ``latest.json`` is replaced to point at it, then all
    but the newest ``keep`` checkpoints are removed. A crash at any point leaves the previous one usable."""
    from safetensors.torch import save_file

    root = os.path.join(out_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=root)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS_FILE))
        torch.save(state, os.path.join(tmp, STATE_FILE))
        for fname in (WEIGHTS_FILE, STATE_FILE):
            with open(os.path.join(tmp, fname), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):  # a re-run of an epoch that was never pointed at, or is being redone
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(root, LATEST), json.dumps({"dir": name, "epoch": epoch}))
    done = sorted(d for d in os.listdir(root) if d.startswith("epoch-") and ".tmp-" not in d)
    for old in done[:-keep]:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(weights, trainer state)`` of a checkpoint directory."""
    from safetensors.torch import load_file

    try:
        weights = load_file(os.path.join(path, WEIGHTS_FILE), device=str(map_location))
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise Relu2DlgnError(f"checkpoint '{path}' is unreadable or incomplete ({exc})") from None
    return weights, state


# --------------------------------------------------------------------------------------------------
# batch norm recalibration, from-scratch DLGNs
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def recalibrate_bn(dlgn: DLGN, loader: Iterable, batches: int, device: torch.device | str | None = None,
                   networks: Sequence[str] = ("gating", "value")) -> int:
    """Re-estimate the batch-norm running statistics of ``networks`` of ``dlgn`` as the plain average over
    ``batches`` training batches, with hard gates — what evaluation uses. Weights are not changed.

    A fresh conversion keeps the source network's statistics, which the gating network (its activations
    removed) no longer produces. Returns the number of batches used.
    """
    norms = [m for net in networks for m in getattr(dlgn, net).modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    device = device or next(dlgn.parameters()).device
    training = dlgn.training
    momenta = [m.momentum for m in norms]
    dlgn.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for batch in loader:
            if used >= batches:
                break
            inputs, _ = _split_batch(batch)
            inputs = tuple(_to(x, device) for x in inputs)
            if not used:
                dlgn.check_inputs(inputs)
            forward_with_preactivations(dlgn, inputs, hard=True)
            used += 1
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        dlgn.train(training)
    return used


def fresh_dlgn(make_model: Callable[[], nn.Module], seed: int = 0, **convert_kwargs: Any) -> DLGN:
    """A DLGN trained from scratch starts here: gating and value networks with *independent* random
    initialisations (``make_model()`` under seeds ``seed`` and ``seed + 1``), the model's own init scheme."""
    from .convert import convert

    torch.manual_seed(seed)
    dlgn = convert(make_model(), **convert_kwargs)
    torch.manual_seed(seed + 1)
    other = convert(make_model(), **convert_kwargs)
    value_state = {k: v for k, v in other.state_dict().items() if k.startswith("value.")}
    dlgn.load_state_dict(value_state, strict=False)
    return dlgn


# --------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------

def _to(x: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], torch.Tensor]:
    if isinstance(batch, dict) and {"input", "target"} <= set(batch):
        batch = (batch["input"], batch["target"])
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InputError(f"a training batch must be (inputs, targets) or a dict with 'input' and 'target', "
                         f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.long, torch.int, torch.int64, torch.int32):
        raise InputError(f"targets must be a tensor of class indices (int64), got "
                         f"{type(y).__name__ if not isinstance(y, torch.Tensor) else y.dtype}")
    return inputs, y


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise InputError(f"fine-tuning needs a classifier whose output is a logits tensor (N, classes); "
                     f"the model returned {type(out).__name__}")


def _grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class _StepModule(nn.Module):
    """What DistributedDataParallel wraps: one forward of the DLGN returning (output, pre-activations)."""

    def __init__(self, dlgn: DLGN, frozen_gating: bool):
        super().__init__()
        self.dlgn = dlgn
        self.frozen_gating = frozen_gating

    def forward(self, beta: torch.Tensor, *inputs: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
        # beta is a 0-d tensor, not the Python float dlgn.beta, so that torch.compile does not recompile
        # every time the schedule changes it
        if self.frozen_gating:  # fixed gates: hard, from the gating network in eval mode, no graph
            r = self.dlgn.run(*inputs, hard=True)
            return r.output, r.pre_activations
        return forward_with_preactivations(self.dlgn, inputs, hard=False, beta=beta)


class Trainer:
    """Fine-tunes a :class:`~relu2dlgn.DLGN` in place. ``Trainer(dlgn, train_loader, val_loader, teacher=model,
    config=FinetuneConfig(...)).fit()``; see :func:`finetune` for the objective and the files written.

    Under ``torchrun`` (a process group initialised, e.g. by :func:`init_distributed`) the model is wrapped in
    ``DistributedDataParallel``; loaders without a ``DistributedSampler`` get one (their ``batch_size`` is per
    process); metrics are reduced over all processes and only rank 0 writes files and prints.
    """

    def __init__(self, dlgn: DLGN, train_loader: Iterable, val_loader: Iterable | None = None, *,
                 teacher: nn.Module | None = None, config: FinetuneConfig | None = None,
                 example_inputs: Sequence[torch.Tensor] | None = None,
                 teacher_leaf_modules: Iterable[type | str] = ()):
        if not isinstance(dlgn, DLGN):
            raise InputError(f"finetune() trains a relu2dlgn.DLGN (from relu2dlgn.convert), got {type(dlgn).__name__}")
        self.cfg = cfg = config or FinetuneConfig()
        cfg.validate()
        self.dlgn = dlgn
        self.distributed = _dist()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.main = self.rank == 0
        self.device = self._pick_device()
        if self.distributed and isinstance(train_loader, DataLoader):
            train_loader = distributed_loader(train_loader, train=True, seed=cfg.seed or 0)
            if isinstance(val_loader, DataLoader):
                val_loader = distributed_loader(val_loader, train=False, seed=0)
        self.train_loader, self.val_loader = train_loader, val_loader
        try:
            self.steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            raise InputError("train_loader must have a length (a DataLoader over a map-style dataset)") from None
        if self.steps_per_epoch == 0:
            raise InputError("train_loader yields no batch (dataset smaller than one batch with drop_last?)")
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in dlgn.modules())
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else \
            (self.device.type == "cuda" and has_conv)
        dlgn.to(self.device)
        if self.channels_last:
            dlgn.to(memory_format=torch.channels_last)

        self.distill = cfg.distill if cfg.distill is not None else teacher is not None
        if self.distill and teacher is None:
            raise ValueError("finetune option distill=True needs a teacher (the source network)")
        self.teacher: nn.Module | None = None
        self.pairs: list[tuple[int, int]] = []
        if teacher is not None:
            teacher = teacher.to(self.device)
            if self.channels_last:
                teacher.to(memory_format=torch.channels_last)
            examples = tuple(_to(e, self.device) for e in example_inputs) if example_inputs is not None else None
            self.teacher = make_teacher(teacher, examples, teacher_leaf_modules).to(self.device).eval()
            self.pairs = match_sites(dlgn, self.teacher.site_nodes, self.teacher.site_kinds)
        self.use_kd = self.distill and cfg.kd_weight > 0
        self.use_gate_loss = self.distill and cfg.gate_weight > 0 and not cfg.freeze_gating

        for p in dlgn.gating.parameters():
            p.requires_grad_(not cfg.freeze_gating)
        for p in dlgn.value.parameters():
            p.requires_grad_(not cfg.freeze_value)
        self.optimizer = self._make_optimizer()
        warmup = int(cfg.warmup_fraction * self.total_steps)
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, warmup))
        self.beta_start = cfg.beta_start if cfg.beta_start is not None else dlgn.beta
        self.beta_end = cfg.beta_end if cfg.beta_end is not None else 3.0 * self.beta_start
        if cfg.beta_schedule == "constant":
            self.beta_end = self.beta_start

        self.step_module: nn.Module = _StepModule(dlgn, cfg.freeze_gating)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DDP(self.step_module, device_ids=ids)
        if cfg.compile:
            self.step_module = torch.compile(self.step_module)
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._checked_inputs = False
        self._checked_pairs = False

    # -- setup ------------------------------------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        if self.cfg.device is not None:
            dev = torch.device(self.cfg.device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"finetune option device={self.cfg.device!r}: CUDA is not available here")
        elif torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            dev = torch.device("cpu")
        if self.distributed and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return dev

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = []
        for net, lr, wd in (("gating", cfg.gating_lr, cfg.gating_weight_decay),
                            ("value", cfg.value_lr, cfg.value_weight_decay)):
            lr = cfg.lr if lr is None else lr
            wd = cfg.weight_decay if wd is None else wd
            params = [p for p in getattr(self.dlgn, net).parameters() if p.requires_grad]
            decay = [p for p in params if p.dim() > 1]
            no_decay = [p for p in params if p.dim() <= 1]
            for ps, w, kind in ((decay, wd, "weights"), (no_decay, 0.0, "biases/norms")):
                if ps:
                    groups.append({"params": ps, "lr": lr, "weight_decay": w, "name": f"{net} {kind}"})
        if not groups:
            raise InputError("the DLGN has no trainable parameter (both networks frozen or parameter-free)")
        # fused kernels: on CPU several times faster than the per-parameter loop (the default there)
        try:
            if cfg.optimizer == "sgd":
                return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=True)
            return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
        except (RuntimeError, TypeError, ValueError):  # a device or dtype without fused kernels
            if cfg.optimizer == "sgd":
                return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
            return torch.optim.AdamW(groups, lr=cfg.lr)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_train_mode(self) -> None:
        self.dlgn.train()
        if self.cfg.freeze_gating:
            self.dlgn.gating.eval()
        if self.cfg.freeze_value:
            self.dlgn.value.eval()

    def _inputs(self, batch: Any) -> tuple[tuple[Any, ...], torch.Tensor]:
        inputs, y = _split_batch(batch)
        inputs = tuple(_to(x, self.device, self.channels_last) for x in inputs)
        y = y.to(self.device, non_blocking=True)
        if not self._checked_inputs:
            self.dlgn.check_inputs(inputs)
            self._checked_inputs = True
        return inputs, y

    def _lrs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for g in self.optimizer.param_groups:
            out.setdefault("lr_" + g["name"].split()[0], g["lr"])
        return out

    # -- one epoch --------------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, y: torch.Tensor, qs: Sequence[torch.Tensor], t_logits: Any,
              t_qs: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        parts = {"ce": ce.detach()}
        loss = ce
        if self.use_kd:
            kd = kd_loss(logits, _logits(t_logits), cfg.temperature)
            loss = (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd
            parts["kd"] = kd.detach()
        if t_qs is not None and self.pairs:
            self._check_pairs(qs, t_qs)
            terms = [site_gate_terms(self.dlgn.gate_specs[i], qs[i], t_qs[j], self.dlgn.beta, loss=self.use_gate_loss)
                     for i, j in self.pairs]
            parts["agree"] = torch.stack([a for _, a, _ in terms])
            parts["decisions"] = torch.tensor([n for _, _, n in terms], device=logits.device)
            if self.use_gate_loss:
                g = torch.stack([t for t, _, _ in terms]).mean()  # type: ignore[misc]
                loss = loss + cfg.gate_weight * g
                parts["gate"] = g.detach()
        return loss, parts

    def _check_pairs(self, qs: Sequence[torch.Tensor], t_qs: Sequence[torch.Tensor]) -> None:
        if self._checked_pairs:
            return
        for i, j in self.pairs:
            if qs[i].shape != t_qs[j].shape:
                s = self.dlgn.sites[i]
                raise InputError(f"site {i} ({s.kind} '{s.node}' at {s.module_path or '<root>'}): the DLGN's "
                                 f"pre-activation has shape {tuple(qs[i].shape)}, the teacher's "
                                 f"{tuple(t_qs[j].shape)}; the teacher is not the model the DLGN was converted from")
        self._checked_pairs = True

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training loader; returns the epoch's training metrics (reduced over processes)."""
        cfg = self.cfg
        self._set_train_mode()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        keys = ("loss", "ce", "kd", "gate")
        sums = torch.zeros(len(keys) + 2, device=self.device, dtype=torch.float64)  # + correct, count
        agree = torch.zeros(len(self.pairs), device=self.device, dtype=torch.float64)
        totals = torch.zeros(len(self.pairs), device=self.device, dtype=torch.float64)
        bar = self._bar(self.train_loader, f"epoch {epoch}/{cfg.epochs}", self.steps_per_epoch)
        t0 = time.perf_counter()
        seen = 0
        for i, batch in enumerate(bar):
            self.dlgn.beta = beta_at(self.step, self.total_steps, self.beta_start, self.beta_end, cfg.beta_schedule)
            inputs, y = self._inputs(batch)
            with self._autocast():
                t_logits, t_qs = None, None
                if self.teacher is not None and (self.use_kd or self.use_gate_loss):
                    with torch.no_grad():
                        t_logits, t_qs = self.teacher(*inputs)
                beta = torch.tensor(self.dlgn.beta, dtype=torch.float32, device=self.device)
                out, qs = self.step_module(beta, *inputs)
                logits = _logits(out)
                loss, parts = self._loss(logits, y, qs, t_logits, t_qs)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = _grad_norm(params)
            bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)).float()
            if self.distributed:
                dist.all_reduce(bad)
            if bad.item():
                self._non_finite(epoch, i, loss, norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            n = y.shape[0]
            seen += n
            with torch.no_grad():
                sums[0] += loss.detach().double() * n
                for k, key in enumerate(keys[1:], start=1):
                    if key in parts:
                        sums[k] += parts[key].double() * n
                sums[4] += (logits.argmax(1) == y).sum()
                sums[5] += n
                if "agree" in parts:
                    agree += parts["agree"]
                    totals += parts["decisions"]
            if self.main and cfg.progress and i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", beta=f"{self.dlgn.beta:.3g}")
        elapsed = time.perf_counter() - t0
        _all_reduce_sum(sums)
        _all_reduce_sum(agree)
        _all_reduce_sum(totals)
        count = max(sums[5].item(), 1.0)
        rec: dict[str, Any] = {"train_loss": sums[0].item() / count, "train_ce": sums[1].item() / count}
        if self.use_kd:
            rec["train_kd"] = sums[2].item() / count
        if self.use_gate_loss:
            rec["train_gate_loss"] = sums[3].item() / count
        rec["train_acc"] = sums[4].item() / count
        if self.pairs and totals.sum().item() > 0:  # the teacher ran in training (distillation)
            rec["train_gate_agreement"] = agree.sum().item() / max(totals.sum().item(), 1.0)
        rec["throughput"] = seen * self.world / elapsed
        rec["epoch_time"] = elapsed
        return rec

    def _non_finite(self, epoch: int, i: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        where = self.cfg.out_dir and latest_checkpoint(self.cfg.out_dir)
        last = (f"The last good checkpoint is intact: {where} (resume with --resume / resume=True, e.g. with a "
                f"lower learning rate)." if where else "No checkpoint was written (no out_dir, or before epoch 1).")
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, batch {i + 1}/{self.steps_per_epoch} (global step {self.step + 1}): "
            f"loss={loss.item():.4g}, gradient norm={norm.item():.4g}, beta={self.dlgn.beta:.4g}. Training stopped "
            f"before this update was applied. {last} Check the inputs for NaN/inf, or lower lr / beta_end, or "
            f"set max_grad_norm.")

    @torch.no_grad()
    def evaluate(self, loader: Iterable | None = None) -> dict[str, Any]:
        """Validation with hard gates (``dlgn.eval()``): loss, accuracy and, with a teacher, the gate agreement
        overall and per site. Leaves the DLGN in eval mode."""
        loader = self.val_loader if loader is None else loader
        if loader is None:
            return {}
        self.dlgn.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        agree = torch.zeros(len(self.pairs), device=self.device, dtype=torch.float64)
        totals = torch.zeros(len(self.pairs), device=self.device, dtype=torch.float64)
        for batch in self._bar(loader, "validate", None, leave=False):
            inputs, y = self._inputs(batch)
            with self._autocast():
                out, qs = forward_with_preactivations(self.dlgn, inputs, hard=True)
                logits = _logits(out).float()
                if self.teacher is not None and self.pairs:
                    _, t_qs = self.teacher(*inputs)
                    self._check_pairs(qs, t_qs)
                    for k, (a, b) in enumerate(self.pairs):
                        _, c, tot = site_gate_terms(self.dlgn.gate_specs[a], qs[a], t_qs[b], 1.0, loss=False)
                        agree[k] += c
                        totals[k] += tot
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.shape[0]
        _all_reduce_sum(sums)
        _all_reduce_sum(agree)
        _all_reduce_sum(totals)
        n = max(sums[2].item(), 1.0)
        rec: dict[str, Any] = {"val_loss": sums[0].item() / n, "val_acc": sums[1].item() / n}
        if self.teacher is not None and self.pairs:
            rec["val_gate_agreement"] = agree.sum().item() / max(totals.sum().item(), 1.0)
            rec["val_gate_agreement_per_site"] = [round(a / max(t, 1.0), 5)
                                                  for a, t in zip(agree.tolist(), totals.tolist())]
        return rec

    def _bar(self, it: Iterable, desc: str, total: int | None, leave: bool = True) -> Any:
        from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on the loader an extra time
        return tqdm(it, desc=desc, total=total, leave=leave, dynamic_ncols=True,
                    disable=not (self.cfg.progress and self.main))

    # -- checkpoints ------------------------------------------------------------------------------------
    def _loader_generator(self) -> torch.Generator | None:
        """The training loader's own shuffling generator (``DataLoader(..., generator=g)``), if it has one:
        its state is part of the random streams a resumed run must continue."""
        gen = getattr(self.train_loader, "generator", None)
        return gen if isinstance(gen, torch.Generator) else None

    def _trainer_state(self) -> dict[str, Any]:
        rng = _rng_state()
        if self._loader_generator() is not None:
            rng["loader"] = self._loader_generator().get_state()
        if self.distributed:
            rngs: list[Any] = [None] * self.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        return {"epoch": self.epoch, "step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "beta": self.dlgn.beta,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "history": self.history,
                "rng": rngs, "world_size": self.world, "config": dataclasses.asdict(self.cfg)}

    def save_checkpoint(self) -> str | None:
        """Checkpoint the epoch just finished (rank 0 writes; every process waits for it)."""
        state = self._trainer_state()  # collective under DDP: every rank must call it
        path = None
        if self.main and self.cfg.out_dir:
            weights = {k: v for k, v in self.dlgn.state_dict().items()}
            path = save_checkpoint(self.cfg.out_dir, self.epoch, weights, state, self.cfg.keep_checkpoints)
        if self.distributed:
            dist.barrier()
        return path

    def resume(self) -> None:
        """Load the newest checkpoint of ``out_dir``: weights, optimiser, schedule, step, beta, history, RNG."""
        out_dir = self.cfg.out_dir
        assert out_dir
        path = latest_checkpoint(out_dir)
        if path is None:
            raise Relu2DlgnError(f"resume: no checkpoint under '{os.path.join(out_dir, CHECKPOINT_DIR)}' "
                                 f"(run without resume to start)")
        weights, state = load_checkpoint(path, self.device)
        result = self.dlgn.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise Relu2DlgnError(f"resume: checkpoint '{path}' does not match this DLGN: missing "
                                 f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise Relu2DlgnError(f"resume: the optimiser state in '{path}' does not fit this run's parameter "
                                 f"groups (frozen networks or optimizer changed?): {exc}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.beta_start, self.beta_end = state["beta_start"], state["beta_end"]
        self.dlgn.beta = state["beta"]
        self.history = list(state["history"])
        rngs = state["rng"]
        if len(rngs) == self.world:
            _set_rng_state(rngs[self.rank])
            if "loader" in rngs[self.rank] and self._loader_generator() is not None:
                self._loader_generator().set_state(rngs[self.rank]["loader"])
        elif self.main:
            print(f"relu2dlgn finetune: checkpoint was written by {len(rngs)} process(es), now {self.world}: the "
                  f"random streams restart (training continues, not bit-for-bit).", file=sys.stderr)
        if self.main:
            self._rewrite_metrics()

    def _metrics_path(self) -> str | None:
        return os.path.join(self.cfg.out_dir, METRICS) if self.cfg.out_dir else None

    def _rewrite_metrics(self) -> None:
        path = self._metrics_path()
        if path:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))

    def _append_metrics(self, rec: dict[str, Any]) -> None:
        path = self._metrics_path()
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> FinetuneResult:
        """Train for ``config.epochs`` epochs (from the last checkpoint with ``resume``)."""
        cfg = self.cfg
        if cfg.out_dir and self.main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        if cfg.resume:
            self.resume()
        else:
            if cfg.seed is not None:
                _seed_all(cfg.seed + self.rank)
            if cfg.out_dir and self.main:
                self._rewrite_metrics()  # a fresh run starts a fresh metrics file
            unfrozen = [n for n, frozen in (("gating", cfg.freeze_gating), ("value", cfg.freeze_value)) if not frozen]
            if cfg.recalibrate_bn:
                recalibrate_bn(self.dlgn, self.train_loader, cfg.recalibrate_bn, self.device, unfrozen)
            if cfg.eval_before and self.val_loader is not None:
                rec = {"epoch": 0, "step": 0, **self.evaluate(), "beta": self.dlgn.beta}
                self._record(rec)
        start = time.perf_counter()
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            lrs = self._lrs()
            rec = {"epoch": epoch, **self.train_epoch(epoch)}
            rec.update(self.evaluate())
            rec.update({"step": self.step, "beta": self.dlgn.beta, **lrs})
            self.epoch = epoch
            self._record(rec)
            self.save_checkpoint()
        elapsed = time.perf_counter() - start
        self.dlgn.eval()
        if cfg.out_dir and self.main:
            self.dlgn.save(os.path.join(cfg.out_dir, MODEL_DIR))
        if self.distributed:
            dist.barrier()
        return self._result(elapsed)

    def _record(self, rec: dict[str, Any]) -> None:
        rec["time"] = time.time()
        self.history.append(rec)
        if self.main:
            self._append_metrics(rec)
            if self.cfg.verbose:
                from tqdm import tqdm
                tqdm.write(_format_record(rec), file=sys.stderr)  # without breaking a progress bar

    def _result(self, elapsed: float) -> FinetuneResult:
        vals = [(r["val_acc"], r["epoch"]) for r in self.history if "val_acc" in r]
        best = max(vals, key=lambda t: (t[0], -t[1])) if vals else (None, None)
        final = self.history[-1] if self.history else {}
        parts = [f"relu2dlgn finetune: {self.epoch} epoch(s), {self.step} steps"]
        if "val_acc" in final:
            parts.append(f"val_acc {final['val_acc']:.4f} (hard gates; best {best[0]:.4f} at epoch {best[1]})")
        if "val_gate_agreement" in final:
            parts.append(f"gate agreement {final['val_gate_agreement']:.4f}")
        if "throughput" in final:
            parts.append(f"{final['throughput']:.0f} img/s")
        parts.append(f"{elapsed:.1f}s")
        if self.cfg.out_dir:
            parts.append(f"model: {os.path.join(self.cfg.out_dir, MODEL_DIR)}")
        summary = ", ".join(parts)
        if self.main and self.cfg.verbose:
            print(summary)
        return FinetuneResult(self.history, best[0], best[1], self.cfg.out_dir, summary)


def _format_record(rec: dict[str, Any]) -> str:
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "val_gate_agreement", "beta", "throughput")
    return f"epoch {rec['epoch']}: " + " ".join(
        f"{k}={rec[k]:.4g}" for k in keys if isinstance(rec.get(k), (int, float)))


def finetune(dlgn: DLGN, train_loader: Iterable, val_loader: Iterable | None = None, *,
             teacher: nn.Module | None = None, epochs: int = 5, config: FinetuneConfig | None = None,
             example_inputs: Sequence[torch.Tensor] | None = None, **options: Any) -> FinetuneResult:
    """Fine-tune a converted DLGN in place on a classification task.

    ``train_loader`` / ``val_loader`` yield ``(inputs, class indices)``; the model's output must be logits.
    With ``teacher`` (the source network — or a DLGN/DGN — converted into ``dlgn``), the loss is

        ``(1 - a) CE(z, y) + a T^2 KL(softmax(t/T) || softmax(z/T)) + lambda * mean_sites BCE(sigmoid(beta q), 1(q^T > 0))``

    (``a = kd_weight = 0.5``, ``T = temperature = 4``, ``lambda = gate_weight = 1``; max-pool and hardtanh
    sites use the matching cross-entropies, see :mod:`relu2dlgn.train`), otherwise ``CE(z, y)``. Soft gates
    ``sigmoid(beta q)`` in training with ``beta`` annealed from ``dlgn.beta`` to three times that; validation
    with hard gates. Any :class:`FinetuneConfig` field can be passed as a keyword (``lr=...``,
    ``freeze_gating=True``, ``out_dir=...``, ``resume=True``, ...).

    Returns a :class:`FinetuneResult` (per-epoch history, best validation accuracy, one-line summary).
    Raises :class:`NonFiniteLossError` if the loss becomes NaN/inf (the last checkpoint stays intact).
    """
    if config is None:
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"finetune() got unknown option(s) {', '.join(unknown)}; valid options: "
                            f"{', '.join(sorted(names))}")
        config = FinetuneConfig(epochs=epochs, **options)
    elif options:
        raise TypeError("pass either config=FinetuneConfig(...) or keyword options, not both")
    trainer = Trainer(dlgn, train_loader, val_loader, teacher=teacher, config=config, example_inputs=example_inputs)
    return trainer.fit()


# --------------------------------------------------------------------------------------------------
# command line: relu2dlgn finetune MODEL --data SPEC ...
# --------------------------------------------------------------------------------------------------

def add_finetune_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``relu2dlgn finetune`` on an ``add_subparsers()`` object."""
    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune", help="convert a model and fine-tune the DLGN on a dataset",
        description="Convert MODEL into a DLGN and fine-tune it. Several GPUs: torchrun --nproc_per_node=N "
                    "-m relu2dlgn.cli finetune ...")
    p.add_argument("model", help="timm:NAME, torchvision:NAME or package.module:factory")
    p.add_argument("--checkpoint", default=None, help="weights of the source model (.safetensors or .pt)")
    p.add_argument("--data", required=True, help="cifar10, cifar100, digits (offline) or imagefolder:PATH")
    p.add_argument("--data-root", default="data", help="where CIFAR is (or goes with --download)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is not under --data-root")
    p.add_argument("--image-size", type=int, default=None, help="input side (default 32; 224 for imagefolder)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="image channels (default 3)")
    p.add_argument("--out", default=None, help="output directory (default runs/finetune-<model>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g = p.add_argument_group("conversion")
    g.add_argument("--value-input", choices=("input", "ones"), default="input")
    g.add_argument("--pool", choices=("gate", "avg"), default="gate")
    g.add_argument("--beta", type=float, default=None, help="initial soft-gate sharpness (default 10)")
    g.add_argument("--no-strict", action="store_true", help="keep nonlinearities that are not gates")
    g.add_argument("--from-scratch", action="store_true",
                   help="start the DLGN from a random initialisation (independent for gating and value)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (split over processes)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--gating-lr", type=float, default=None)
    g.add_argument("--value-lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=None)
    g.add_argument("--beta-end", type=float, default=None, help="final beta (default 3x the initial)")
    g.add_argument("--beta-schedule", choices=("constant", "geometric", "linear"), default=d.beta_schedule)
    g.add_argument("--freeze-gating", action="store_true", help="fixed gates: train only the value network")
    g.add_argument("--freeze-value", action="store_true", help="train only the gating network")
    g.add_argument("--distill", action="store_true",
                   help="distil from the source model (logits + gate agreement); needs --checkpoint")
    g.add_argument("--kd-weight", type=float, default=d.kd_weight)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--gate-weight", type=float, default=d.gate_weight)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step")
    g.add_argument("--workers", type=int, default=None, help="data loader processes (default: up to 8)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    """``relu2dlgn finetune``: build the source model, convert it, fine-tune the DLGN, save it under --out."""
    from .convert import convert
    from .data import load_data, make_loader
    from .zoo import create_model

    rank, world, _ = init_distributed()
    if args.distill and not args.checkpoint:
        raise InputError("--distill needs --checkpoint: the source model must be trained to be a teacher")
    if args.batch_size % world:
        raise InputError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if rank == 0 and args.download:
        load_data(args.data, args.data_root, image_size=args.image_size, channels=args.channels, download=True)
    if world > 1:
        dist.barrier()
    data = load_data(args.data, args.data_root, image_size=args.image_size, channels=args.channels)
    workers = args.workers if args.workers is not None else (0 if args.data == "digits" else
                                                             min(8, max(1, (os.cpu_count() or 2) // world)))
    cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    train_loader = make_loader(data.train, args.batch_size // world, train=True, workers=workers, seed=args.seed,
                               pin_memory=cuda)
    val_loader = make_loader(data.val, args.batch_size // world, train=False, workers=workers, pin_memory=cuda)

    kwargs: dict[str, Any] = {"num_classes": data.num_classes}
    if data.in_chans != 3:
        kwargs["in_chans"] = data.in_chans
    example = data.example_inputs()
    convert_kwargs: dict[str, Any] = {"mode": "dlgn", "example_inputs": example, "value_input": args.value_input,
                                      "pool": args.pool, "strict": not args.no_strict}
    if args.beta is not None:
        convert_kwargs["beta"] = args.beta

    def source() -> nn.Module:
        return create_model(args.model, checkpoint=None if args.from_scratch else args.checkpoint, **kwargs).eval()

    if args.from_scratch:
        dlgn = fresh_dlgn(source, seed=args.seed, **convert_kwargs)
    else:
        torch.manual_seed(args.seed)
        dlgn = convert(source(), **convert_kwargs)
    teacher = create_model(args.model, checkpoint=args.checkpoint, **kwargs).eval() if args.distill else None
    out = args.out or os.path.join("runs", f"finetune-{args.model.replace(':', '-')}-"
                                           f"{args.data.replace(':', '-').replace('/', '_')}")
    cl = {"auto": None, "on": True, "off": False}[args.channels_last]
    config = FinetuneConfig(
        epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, gating_lr=args.gating_lr, value_lr=args.value_lr,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, beta_end=args.beta_end,
        beta_schedule=args.beta_schedule, freeze_gating=args.freeze_gating, freeze_value=args.freeze_value,
        distill=args.distill, kd_weight=args.kd_weight, temperature=args.temperature, gate_weight=args.gate_weight,
        device=args.device, amp=False if args.no_amp else None, channels_last=cl, compile=args.compile,
        out_dir=out, resume=args.resume, seed=args.seed, progress=not args.no_progress)
    try:
        config.validate()
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if rank == 0:
        print(f"relu2dlgn finetune: {args.model} on {data.name} ({len(data.train)} train / {len(data.val)} val, "
              f"{data.num_classes} classes), {len(dlgn.sites)} gate sites, {world} process(es), output {out}",
              file=sys.stderr)
    finetune(dlgn, train_loader, val_loader, teacher=teacher, config=config, example_inputs=example)
    if world > 1:
        dist.destroy_process_group()
    return 0

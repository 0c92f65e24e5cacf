"""Checkpoints of a fine-tuning run: ``OUT/checkpoints/epoch-NNNN/{model.safetensors, trainer.pt}`` and the
pointer ``OUT/checkpoints/latest.json``.

Each checkpoint directory is written with :func:`relu2dlgn.utils.fs.atomic_dir` (complete or absent), then
``latest.json`` is replaced atomically to point at it, then older checkpoints beyond ``keep`` are removed: a
crash at any point leaves the previous checkpoint usable and pointed at. Leftover temporary directories of a
killed write are ignored. A state holding NaN/inf is never written (:class:`NonFiniteLossError`), so rotation
never removes the newest finite checkpoint in favour of a bad one.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, NonFiniteLossError
from ..utils.fs import atomic_dir, atomic_write_text
from .guard import non_finite_names

CHECKPOINT_DIR, LATEST, METRICS, MODEL_DIR = "checkpoints", "latest.json", "metrics.jsonl", "model"
WEIGHTS_FILE, STATE_FILE = "model.safetensors", "trainer.pt"


def checkpoint_dirs(out_dir: str) -> list[str]:
    """The complete checkpoint directory names under ``out_dir``, oldest first."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("epoch-") and ".tmp-" not in d and ".old-" not in d)


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint directory under ``out_dir`` (``None`` if there is none)."""
    pointer = os.path.join(out_dir, CHECKPOINT_DIR, LATEST)
    if not os.path.exists(pointer):
        return None
    try:
        with open(pointer) as f:
            name = json.load(f)["dir"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{pointer}: unreadable checkpoint pointer ({exc})") from None
    path = os.path.join(out_dir, CHECKPOINT_DIR, name)
    if not os.path.isdir(path):
        raise LoadError(f"{pointer} names '{name}', which does not exist under {os.path.dirname(pointer)}")
    return path


def save_checkpoint(out_dir: str, epoch: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int) -> str:
    """Write ``checkpoints/epoch-NNNN/`` atomically, point ``latest.json`` at it, keep the newest ``keep``.

    Raises :class:`NonFiniteLossError` naming the tensors, before writing or removing anything, when a weight
    or buffer holds NaN/inf."""
    from safetensors.torch import save_file

    root = os.path.join(out_dir, CHECKPOINT_DIR)
    name = f"epoch-{epoch:04d}"
    final = os.path.join(root, name)
    bad = non_finite_names(weights)
    if bad:
        previous = latest_checkpoint(out_dir)
        raise NonFiniteLossError(f"checkpoint {final} not written: {', '.join(bad[:5])} hold NaN/inf; the newest "
                                 f"checkpoint is kept as it is: {previous or 'none'}")
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS_FILE))
        torch.save(state, os.path.join(tmp, STATE_FILE))
    atomic_write_text(os.path.join(root, LATEST), json.dumps({"dir": name, "epoch": epoch}))
    for old in checkpoint_dirs(out_dir)[:-keep]:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(weights, trainer state)`` of a checkpoint directory; :class:`LoadError` names the file if it is
    missing, truncated or corrupted."""
    from safetensors.torch import load_file

    weights_path, state_path = os.path.join(path, WEIGHTS_FILE), os.path.join(path, STATE_FILE)
    try:
        weights = load_file(weights_path, device=str(map_location))
    except Exception as exc:  # safetensors raises its own error type, OSError, ValueError ...
        raise LoadError(f"checkpoint weights '{weights_path}' are missing or corrupted "
                        f"({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling raises many types (UnpicklingError, EOFError, ...)
        raise LoadError(f"checkpoint trainer state '{state_path}' is missing or corrupted "
                        f"({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        raise LoadError(f"checkpoint trainer state '{state_path}' is not a relu2dlgn trainer state")
    return weights, state


_STATE_KEYS = {"epoch", "step", "optimizer", "scheduler", "beta", "beta_start", "beta_end", "history", "rng"}


def check_fits(path: str, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """:class:`LoadError` naming the checkpoint's weights file unless ``weights`` has exactly the names and
    shapes of ``expected`` (the model's ``state_dict``): a checkpoint of another architecture or run."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if not (missing or unexpected or wrong):
        return
    parts = [f"{len(keys)} {title} (e.g. {', '.join(keys[:3])})"
             for title, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if wrong:
        parts.append(f"{len(wrong)} of another shape (" + ", ".join(
            f"{k}: {tuple(weights[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
            for k in wrong[:3]) + ")")
    raise LoadError(f"resume: checkpoint weights '{os.path.join(path, WEIGHTS_FILE)}' do not fit this model (another "
                    f"architecture or run?): " + "; ".join(parts))


def restore_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                       map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load checkpoint directory ``path`` into ``model``, ``optimizer`` and ``scheduler``; returns the trainer
    state (epoch, step, beta, history, RNG) for the caller to apply.

    Raises :class:`LoadError` naming the file for a damaged checkpoint, weights that do not fit ``model``
    (names and shapes, checked before anything is loaded) and optimiser or schedule states that do not fit."""
    weights, state = load_checkpoint(path, map_location)
    check_fits(path, weights, model.state_dict())
    model.load_state_dict(weights, strict=True)
    state_path = os.path.join(path, STATE_FILE)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"resume: the optimiser state in '{state_path}' does not fit this run's parameter groups "
                        f"(frozen networks or optimizer changed?): {exc}") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoadError(f"resume: the schedule state in '{state_path}' is unreadable: {exc}") from None
    return state

"""Saving and loading converted models.

A saved DLGN is a directory:

* ``config.json`` — format version, conversion options, the gate-site table, the weight manifest;
* ``model.safetensors`` — every parameter and persistent buffer (``gating.*`` and ``value.*``);
* ``graphs.pt`` — the module structure (both fx graphs and their submodules) with every tensor in
  ``model.safetensors`` replaced by a ``meta`` tensor, so it holds no weights. It is a pickle: load only
  directories you trust, as with any ``torch.load(weights_only=False)``.

The directory is written under a temporary name and renamed into place, so an interrupted save never leaves
a half-written model at ``path``. An existing save is moved aside (``path.old-*``) only once the new one is
complete and deleted after the new one is in place; if the process dies between those two renames,
:func:`load` finds the previous save there.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from .errors import LoadError

FORMAT_VERSION = 1
CONFIG, WEIGHTS, GRAPHS = "config.json", "model.safetensors", "graphs.pt"


def _skeleton(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and persistent buffers are meta tensors (no data)."""
    skel = copy.deepcopy(module)
    for m in skel.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to("meta")
    return skel


def save(dlgn: Any, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    from . import __version__

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot save to '{path}': cannot create directory '{parent}' ({exc})") from None
    state = {k: v.detach().contiguous().clone().cpu() for k, v in dlgn.state_dict().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "relu2dlgn_version": __version__,
        "mode": dlgn.mode, "value_input": dlgn.value_input, "pool": dlgn.pool, "beta": dlgn.beta,
        "training": dlgn.training,
        "inputs": [s.as_dict() for s in dlgn.input_specs],
        "sites": [s.as_dict() for s in dlgn.sites],
        "report": dlgn.report.as_dict(),
        "weights": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in state.items()},
    }
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "relu2dlgn": __version__})
        torch.save(_skeleton(dlgn), os.path.join(tmp, GRAPHS))
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: str, dst: str) -> None:
    if os.path.exists(dst):
        if not os.path.isdir(dst) or (os.listdir(dst) and not os.path.exists(os.path.join(dst, CONFIG))):
            raise OSError(f"cannot save to '{dst}': it exists and is not a relu2dlgn save directory")
        old = dst + ".old-" + os.path.basename(src)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a DLGN saved with :meth:`DLGN.save`. Raises :class:`LoadError` naming the file and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .dlgn import DLGN

    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG)
    if not os.path.exists(path):
        # a save that replaced an existing model and was interrupted between its two renames left the
        # previous model as PATH.old-*: it is complete, so load it
        previous = sorted(glob.glob(glob.escape(path) + ".old-*"), key=os.path.getmtime)
        if previous and os.path.exists(os.path.join(previous[-1], CONFIG)):
            warnings.warn(f"'{path}' is missing; loading the previous save '{previous[-1]}' left by an "
                          f"interrupted save", stacklevel=2)
            path, config_path = previous[-1], os.path.join(previous[-1], CONFIG)
    if not os.path.isdir(path) or not os.path.exists(config_path):
        raise LoadError(f"'{path}' is not a saved relu2dlgn model (no {CONFIG})")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{config_path}: unreadable or corrupted config ({exc})") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int):
        raise LoadError(f"{config_path}: no format_version; not a relu2dlgn config")
    if version > FORMAT_VERSION:
        raise LoadError(f"{config_path}: format version {version} was written by a newer relu2dlgn "
                        f"({config.get('relu2dlgn_version')}); this one reads up to version {FORMAT_VERSION}. "
                        f"Upgrade relu2dlgn.")
    weights_path = os.path.join(path, WEIGHTS)
    try:
        state = load_file(weights_path, device=str(map_location))
    except FileNotFoundError:
        raise LoadError(f"{weights_path}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{weights_path}: corrupted or truncated weights file ({exc})") from None
    graphs_path = os.path.join(path, GRAPHS)
    try:
        skel = torch.load(graphs_path, weights_only=False, map_location="meta")
    except FileNotFoundError:
        raise LoadError(f"{graphs_path}: missing") from None
    except Exception as exc:  # unpickling raises many types
        raise LoadError(f"{graphs_path}: corrupted or unreadable graph file ({type(exc).__name__}: {exc})") from None
    if not isinstance(skel, DLGN):
        raise LoadError(f"{graphs_path}: does not hold a DLGN (found {type(skel).__name__})")
    expected = skel.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {title} (e.g. {', '.join(keys[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape (e.g. " + ", ".join(
                f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3]) + ")")
        raise LoadError(f"{weights_path}: weights do not match the architecture in {graphs_path}: "
                        + "; ".join(parts))
    skel.load_state_dict(state, strict=True, assign=True)
    skel.to(map_location)
    return skel

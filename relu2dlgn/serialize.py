"""The on-disk format of a saved model (it knows nothing of what the module is: :mod:`relu2dlgn.dlgn` gives it
the module and its config, and checks the class of what it reads back).

A saved model is a directory:

* ``config.json`` — format version, the model's options and site table (written by the caller), the weight
  manifest (``weights``: name, shape, dtype of every tensor) and, from format version 2, the SHA-256 checksum and
  size of each of the two files below (``files``), verified on load;
* ``model.safetensors`` — every parameter and persistent buffer;
* ``graphs.pt`` — the module structure (for a DLGN: both fx graphs and their submodules) with every tensor in
  ``model.safetensors`` replaced by a ``meta`` tensor, so it holds no weights. It is a pickle: load only
  directories you trust, as with any ``torch.load(weights_only=False)``.

The directory is written with :func:`relu2dlgn.utils.fs.atomic_dir`: an interrupted save never leaves a
half-written model at ``path``, and an existing save is replaced only by a complete one; if the process dies
between the two renames of the replacement, :func:`read_model` finds the previous save (``path.old-*``).

Format versions: 1 (relu2dlgn 0.1: no checksums) is still read; 2 adds ``files``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .errors import LoadError
from .utils.fs import atomic_dir, previous_version

FORMAT_VERSION = 2
CHECKSUMS_SINCE = 2  # the first format version whose config records the files' checksums
CONFIG, WEIGHTS, GRAPHS = "config.json", "model.safetensors", "graphs.pt"


def sha256_of(path: str) -> str:
    """The hex SHA-256 digest of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _skeleton(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and persistent buffers are meta tensors (no data); a tensor shared by
    several modules (tied parameters) stays one shared meta tensor."""
    skel = copy.deepcopy(module)
    meta: dict[int, torch.Tensor] = {}
    for m in skel.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in meta:
                    meta[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                m._parameters[name] = meta[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None and name not in m._non_persistent_buffers_set:
                meta[id(b)] = meta.get(id(b)) if id(b) in meta else b.to("meta")
                m._buffers[name] = meta[id(b)]
    return skel


def _shared(skel: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, attribute) that hold one shared parameter or buffer (tied weights)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in skel.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            slots.setdefault(id(t), []).append((m, name))
    return [group for group in slots.values() if len(group) > 1]


def _retie(groups: list[list[tuple[nn.Module, str]]]) -> None:
    """Make each group share one tensor again (``load_state_dict(assign=True)`` gives every name its own)."""
    for (m0, name0), *rest in groups:
        shared = getattr(m0, name0)
        for m, name in rest:
            setattr(m, name, shared)


def _is_save_dir(path: str) -> bool:
    return os.path.isdir(path) and (not os.listdir(path) or os.path.exists(os.path.join(path, CONFIG)))


def write_model(module: nn.Module, config: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``module`` (weights + weight-less structure) and ``config`` to directory ``path``, atomically.

    Raises ``OSError`` naming ``path`` when it exists and is not a save directory, or its parent cannot be
    created; nothing is written then."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot save to '{path}': cannot create directory '{parent}' ({exc})") from None
    if os.path.exists(path) and not _is_save_dir(path):
        raise OSError(f"cannot save to '{path}': it exists and is not a relu2dlgn save directory")
    state = {k: v.detach().contiguous().clone().cpu() for k, v in module.state_dict().items()}
    config = {**config, "weights": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                                    for k, v in state.items()}}
    with atomic_dir(path) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "relu2dlgn": __version__})
        torch.save(_skeleton(module), os.path.join(tmp, GRAPHS))
        config["files"] = {name: {"sha256": sha256_of(os.path.join(tmp, name)),
                                  "size": os.path.getsize(os.path.join(tmp, name))} for name in (WEIGHTS, GRAPHS)}
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)


def read_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(module, config)`` from a directory written by :func:`write_model`.

    Raises :class:`LoadError` naming the file and the problem: no such directory, an unreadable or newer
    config, a missing/truncated/corrupted weights or graph file, weights of another architecture, a file whose
    checksum differs from the one recorded at save time (format version 2)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        previous = previous_version(path, CONFIG)
        if previous is not None:
            warnings.warn(f"'{path}' is missing; loading the previous save '{previous}' left by an interrupted "
                          f"save", stacklevel=3)
            path = previous
    config_path = os.path.join(path, CONFIG)
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
    if not isinstance(skel, nn.Module):
        raise LoadError(f"{graphs_path}: does not hold a model (found {type(skel).__name__})")
    _check_weights(skel, state, weights_path, graphs_path)
    if version >= CHECKSUMS_SINCE:  # after parsing, so that a truncated or mismatched file is named as such
        _verify_checksums(path, config, config_path)
    shared = _shared(skel)
    skel.load_state_dict(state, strict=True, assign=True)
    _retie(shared)
    skel.to(map_location)
    return skel, config


def _verify_checksums(path: str, config: dict[str, Any], config_path: str) -> None:
    """Each file's SHA-256 against the one ``config.json`` records (:class:`LoadError` naming the file)."""
    files = config.get("files")
    if not isinstance(files, dict) or not all(isinstance(files.get(n), dict) and isinstance(files[n].get("sha256"), str)
                                              for n in (WEIGHTS, GRAPHS)):
        raise LoadError(f"{config_path}: no checksums of {WEIGHTS} and {GRAPHS} ('files'), which format version "
                        f"{config['format_version']} records; the config was damaged or edited")
    for name in (WEIGHTS, GRAPHS):
        file_path = os.path.join(path, name)
        if not os.path.exists(file_path):
            raise LoadError(f"{file_path}: missing")
        recorded = files[name]["sha256"]
        try:
            found = sha256_of(file_path)
        except OSError as exc:
            raise LoadError(f"{file_path}: unreadable ({exc})") from None
        if found != recorded:
            raise LoadError(f"{file_path}: sha256 checksum {found[:16]}... does not match the one recorded in "
                            f"{CONFIG} at save time ({recorded[:16]}...): the file was changed or damaged after it was "
                            f"saved (a flipped bit, a partial copy); restore it from a good copy")


def _check_weights(skel: nn.Module, state: dict[str, torch.Tensor], weights_path: str, graphs_path: str) -> None:
    expected = skel.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or wrong):
        return
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {title} (e.g. {', '.join(keys[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} with another shape (e.g. " + ", ".join(
            f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3]) + ")")
    raise LoadError(f"{weights_path}: weights do not match the architecture in {graphs_path}: " + "; ".join(parts))

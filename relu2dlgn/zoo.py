"""Model specs for the command line: ``timm:NAME``, ``torchvision:NAME`` (or ``tv:NAME``), ``module:attr``."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import LoadError, OptionError
from .options import option


@dataclass
class ModelOptions:
    """Which source network: a model spec and, optionally, its trained weights."""

    model: str | None = option(None, "timm:NAME, torchvision:NAME or package.module:factory", flags=("model",))
    checkpoint: str | None = option(None, "weights of the source model (.safetensors or .pt)")


def create_model(spec: str, num_classes: int | None = None, checkpoint: str | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model from ``spec`` (nothing is downloaded), optionally loading weights.

    ``checkpoint``: a ``.safetensors`` file or a ``torch.save``'d state dict of the model's parameters.

    Raises :class:`OptionError` naming the spec when it is malformed or names no model (an unknown timm or
    torchvision name, a module that cannot be imported, an attribute that is missing, is not a factory of an
    ``nn.Module`` or does not take the arguments), and :class:`LoadError` naming the file for a checkpoint that
    is missing, unreadable or of another architecture (see :func:`load_weights`).
    """
    lib, sep, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and lib and name):
        raise OptionError(f"model spec {spec!r} must look like timm:NAME, torchvision:NAME or package.module:factory")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if lib == "timm":
        import timm
        if not timm.is_model(name):
            raise OptionError(f"model spec {spec!r}: timm has no model '{name}' (see timm.list_models())")
        model = _build(spec, lambda: timm.create_model(name, pretrained=False, **kwargs))
    elif lib in ("torchvision", "tv"):
        import torchvision
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError as exc:
            raise OptionError(f"model spec {spec!r}: torchvision has no model '{name}' ({exc})") from None
        if name == "inception_v3":
            kwargs.setdefault("aux_logits", False)
            kwargs.setdefault("init_weights", True)
        model = _build(spec, lambda: builder(weights=None, **kwargs))
    else:
        try:
            module = importlib.import_module(lib)
        except ImportError as exc:
            raise OptionError(f"model spec {spec!r}: cannot import module '{lib}' ({exc})") from None
        factory = getattr(module, name, None)
        if not callable(factory):
            raise OptionError(f"model spec {spec!r}: module '{lib}' has no callable '{name}'")
        model = _build(spec, lambda: factory(**kwargs))
    if not isinstance(model, nn.Module):
        raise OptionError(f"model spec {spec!r} did not return an nn.Module (got {type(model).__name__})")
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def _build(spec: str, make: Callable[[], Any]) -> Any:
    """``make()``; a ``TypeError`` (the factory does not take these arguments) becomes an :class:`OptionError`."""
    try:
        return make()
    except TypeError as exc:
        raise OptionError(f"model spec {spec!r}: the factory cannot be called with these arguments "
                          f"({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Load a state dict (``.safetensors`` or ``torch.save``'d, optionally under ``"state_dict"``) into ``model``.

    Raises :class:`LoadError` naming the file: missing, unreadable or corrupted, not a state dict, tensors of
    other shapes than the model's (each named with both shapes), missing or unexpected keys."""
    if not os.path.exists(checkpoint):
        raise LoadError(f"checkpoint '{checkpoint}' does not exist")
    try:
        if checkpoint.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' own error, UnpicklingError, EOFError, RuntimeError (zip), OSError ...
        raise LoadError(f"checkpoint '{checkpoint}' is corrupted or not a weights file ({_first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else \
            ("an empty dict" if not state else "a dict with non-tensor entries")
        raise LoadError(f"checkpoint '{checkpoint}' does not hold a state dict of tensors (found {found})")
    expected = model.state_dict()
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        shapes = ", ".join(f"{k}: {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)} in the model"
                           for k in wrong[:3])
        raise LoadError(f"checkpoint '{checkpoint}' does not match the model ({type(model).__name__}): "
                        f"{len(wrong)} tensor(s) of another shape ({shapes})")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LoadError(f"checkpoint '{checkpoint}' does not match the model ({type(model).__name__}): missing "
                        f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")

"""Model specs for the command line: ``timm:NAME``, ``torchvision:NAME`` (or ``tv:NAME``), ``module:attr``."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConversionError
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
    """
    if ":" not in spec:
        raise ConversionError(f"model spec '{spec}' must look like timm:NAME, torchvision:NAME or package.module:attr")
    lib, name = spec.split(":", 1)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if lib == "timm":
        import timm
        if not timm.is_model(name):
            raise ConversionError(f"timm has no model '{name}' (see timm.list_models())")
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif lib in ("torchvision", "tv"):
        import torchvision
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError as exc:
            raise ConversionError(f"torchvision has no model '{name}' ({exc})") from None
        if name == "inception_v3":
            kwargs.setdefault("aux_logits", False)
            kwargs.setdefault("init_weights", True)
        model = builder(weights=None, **kwargs)
    else:
        try:
            module = importlib.import_module(lib)
            factory = getattr(module, name)
        except (ImportError, AttributeError) as exc:
            raise ConversionError(f"cannot import '{name}' from module '{lib}' ({exc})") from None
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ConversionError(f"'{spec}' did not return an nn.Module (got {type(model).__name__})")
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Load a state dict into ``model`` with a clear error naming the file and the mismatching keys."""
    if not os.path.exists(checkpoint):
        raise ConversionError(f"checkpoint '{checkpoint}' does not exist")
    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(f"checkpoint '{checkpoint}' does not match the model: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")

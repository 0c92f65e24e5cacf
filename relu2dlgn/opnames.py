"""How an operation of a traced graph is named in messages: as a user would spell it (``F.gelu``,
``torch.sigmoid``, ``Tensor.sin``, ``operator.mul``, ``nn.LSTM``), opaque leaves with their class."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_NAMES: dict[int, str] = {}


def function_name(fn: Callable) -> str:
    """``F.gelu``, ``torch.sigmoid``, ``operator.mul``: how a user would spell the function."""
    if not _NAMES:
        for prefix, namespace in (("operator.", operator), ("F.", F), ("torch.", torch)):
            for k, v in vars(namespace).items():
                if callable(v) and not k.startswith("__"):
                    _NAMES.setdefault(id(v), prefix + k)
        for k, v in vars(F).items():   # functional ops implemented in torch.nn.functional / torch._C._nn
            if callable(v) and getattr(v, "__module__", "") in ("torch.nn.functional", "torch._C._nn"):
                _NAMES[id(v)] = "F." + k
        for k, v in vars(torch).items():
            if callable(v) and getattr(v, "__module__", "") == "torch" and not k.startswith("_"):
                _NAMES[id(v)] = "torch." + k
    name = _NAMES.get(id(fn))
    if name is not None:
        return name
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}".lstrip(".")


def module_name(m: nn.Module) -> str:
    """``nn.LSTM``; ``TorchScript module``/``opaque leaf module`` with the class name for other modules."""
    cls = type(m)
    if isinstance(m, torch.jit.ScriptModule):
        return f"TorchScript module {getattr(m, 'original_name', cls.__name__)} (opaque leaf, not proven affine)"
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    return f"opaque leaf module {cls.__module__}.{cls.__qualname__} (not proven affine)"


def op_name(node: fx.Node, modules: dict[str, Any]) -> str:
    if node.op == "call_module":
        return module_name(modules[node.target])
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return function_name(node.target)
    return f"{node.op} {node.target}"


# --------------------------------------------------------------------------------------------------

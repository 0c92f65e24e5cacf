"""The leaf policy of the tracer: which modules stay opaque, which are traced into, which are split.

Highest priority first:

1. ``leaf_modules`` given by the user (types or module paths) and TorchScript modules are opaque leaves;
2. timm's norm+activation modules (``BatchNormAct2d`` family) are *split*: the norm stays one module call
   (so ``train()``/``eval()`` keep working) and its ``drop``/``act`` children are traced as separate calls,
   which exposes the activation as a gate site (:func:`split_norm_act`);
3. modules whose forward branches on ``self.training`` (DropPath, DropBlock, StochasticDepth) are leaves,
   and so are timm's registered "no-trace" modules unless they contain activation modules (timm's VGG
   ``ConvMlp``) or are a gate module with its own ``forward`` (timm's ``MaxPool2dSame``): those are traced
   into, so their activations become gates (one that cannot be traced stays opaque, :mod:`relu2dlgn.capture`);
4. otherwise torch.fx's rule: ``torch.nn`` modules are leaves, everything else is traced through.
"""
from __future__ import annotations

import sys
from typing import Callable

from torch import nn

from .sites import is_activation_module, overrides_gate

# torch.nn modules that make a module worth tracing into (rule 3): their calls become gates or are named as
# nonlinearities instead of disappearing inside an opaque leaf
_NONLINEAR_MODULES: tuple[type, ...] = (
    nn.Sigmoid, nn.Tanh, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.GLU, nn.RReLU,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.LocalResponseNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.MultiheadAttention,
)


def timm_notrace() -> tuple[set[type], set[Callable]]:
    """timm's registered no-trace modules and functions (empty when timm is not imported)."""
    if "timm" not in sys.modules:
        return set(), set()
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # pragma: no cover - timm without fx helpers
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


def training_dependent_types() -> tuple[type, ...]:
    """Module types whose forward branches on ``self.training`` (stochastic depth, drop block)."""
    out: list[type] = []
    if "timm" in sys.modules:
        try:
            from timm.layers import DropBlock2d, DropPath
            out += [DropPath, DropBlock2d]
        except Exception:  # pragma: no cover
            pass
    if "torchvision" in sys.modules:
        try:
            from torchvision.ops import StochasticDepth
            out.append(StochasticDepth)
        except Exception:  # pragma: no cover
            pass
    return tuple(out)


# ---- norm + activation modules (timm) --------------------------------------------------------------

def norm_base(m: nn.Module) -> type | None:
    """The plain norm class that ``m`` (a timm norm+act module) computes before its drop/act."""
    if not ("timm" in sys.modules and hasattr(m, "act") and isinstance(m.act, nn.Module)):
        return None
    try:
        from timm.layers import norm_act
    except Exception:  # pragma: no cover
        return None
    if isinstance(m, (norm_act.BatchNormAct2d, getattr(norm_act, "SyncBatchNormAct", ()))):
        return nn.BatchNorm2d
    if isinstance(m, norm_act.FrozenBatchNormAct2d):
        from torchvision.ops.misc import FrozenBatchNorm2d
        return FrozenBatchNorm2d
    if isinstance(m, norm_act.GroupNormAct):
        return nn.GroupNorm
    if type(m).__name__ == "LayerNormAct":
        return nn.LayerNorm
    return None


def split_norm_act(m: nn.Module) -> tuple[nn.Module, list[str]] | None:
    """A plain norm module sharing ``m``'s parameters and buffers, and the names of the children to call
    after it (``drop``, ``act``). ``None`` if ``m`` is not a norm+act module."""
    base = norm_base(m)
    if base is None:
        return None
    norm = base.__new__(base)
    state = {k: (dict(v) if k in ("_parameters", "_buffers", "_modules") else v) for k, v in m.__dict__.items()}
    for child in ("act", "drop"):
        state["_modules"].pop(child, None)
    norm.__dict__.update(state)
    after = [c for c in ("drop", "act") if isinstance(getattr(m, c, None), nn.Module)
             and not isinstance(getattr(m, c), nn.Identity)]
    return norm, after


def contains_activation(m: nn.Module) -> bool:
    """True if a submodule of ``m`` is a gate activation or a known non-gate nonlinearity, or ``m`` is a gate
    module whose ``forward`` is overridden (timm's ``MaxPool2dSame`` pads, then max-pools)."""
    return overrides_gate(m) or any(is_activation_module(sub) or isinstance(sub, _NONLINEAR_MODULES)
                                    for sub in m.modules() if sub is not m)

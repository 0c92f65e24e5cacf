"""The allow-list for module calls: a :class:`ModuleRule` per ``torch.nn`` (and timm / torchvision) class, by
category (see :mod:`relu2dlgn.affine`). A module is listed only with its class's own ``forward``."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .functions import IDENTITY, LINEAR, MOVE, NORM, PAD, POOL

def _bn_check(m: nn.Module) -> str | None:
    if not (m.track_running_stats and m.running_mean is not None and m.running_var is not None):
        return "without running statistics (normalises with batch statistics)"
    return None


@dataclass(frozen=True)
class ModuleRule:
    category: str
    operands: int = 1          # input-dependent operands allowed among the first ``operands`` arguments
    product: bool = False      # at most one of them may depend on the input
    check: Callable[[nn.Module], str | None] | None = None


_MODULE_RULES: dict[type, ModuleRule] = {
    **{t: ModuleRule(LINEAR) for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                       nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Identity)},
    nn.Bilinear: ModuleRule(LINEAR, operands=2, product=True),
    **{t: ModuleRule(NORM, check=_bn_check) for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                                      nn.SyncBatchNorm)},
    **{t: ModuleRule(MOVE) for t in (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
                                     nn.Fold, nn.Unfold)},
    **{getattr(nn, f"{kind}Pad{d}d"): ModuleRule(PAD) for kind in ("Zero", "Reflection", "Replication", "Circular")
       for d in (1, 2, 3) if hasattr(nn, f"{kind}Pad{d}d")},
    **{getattr(nn, f"ConstantPad{d}d"): ModuleRule(PAD, check=lambda m: None if math.isfinite(m.value) else
                                                   f"with the non-finite value {m.value}") for d in (1, 2, 3)},
    **{t: ModuleRule(POOL) for t in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                                     nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample,
                                     nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)},
    **{t: ModuleRule(IDENTITY) for t in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                         nn.FeatureAlphaDropout)},
}


_LIBRARY_RULES: dict[frozenset[str], dict[type, ModuleRule]] = {}


def _library_module_rules() -> dict[type, ModuleRule]:
    """Listed modules of timm and torchvision (only when those libraries are imported)."""
    key = frozenset(n for n in ("timm", "torchvision", "timm.layers.conv2d_same", "timm.layers.pool2d_same",
                                "timm.layers.std_conv") if n in sys.modules)
    if key not in _LIBRARY_RULES:
        _LIBRARY_RULES[key] = _find_library_module_rules()
    return _LIBRARY_RULES[key]


def _find_library_module_rules() -> dict[type, ModuleRule]:
    out: dict[type, ModuleRule] = {}
    if "timm" in sys.modules:
        try:
            from timm.layers import DropBlock2d, DropPath
            out[DropPath] = out[DropBlock2d] = ModuleRule(IDENTITY)
        except Exception:  # pragma: no cover - other timm versions
            pass
        for path, name in (("timm.layers.conv2d_same", "Conv2dSame"), ("timm.layers.pool2d_same", "AvgPool2dSame"),
                           ("timm.layers.std_conv", "StdConv2dSame"), ("timm.layers.std_conv", "ScaledStdConv2dSame")):
            cls = getattr(sys.modules.get(path), name, None)
            if isinstance(cls, type):
                out[cls] = ModuleRule(POOL if "Pool" in name else LINEAR)
    if "torchvision" in sys.modules:
        try:
            from torchvision.ops import StochasticDepth
            out[StochasticDepth] = ModuleRule(IDENTITY)
        except Exception:  # pragma: no cover
            pass
    return out


def module_rule(m: nn.Module) -> ModuleRule | None:
    """The rule for a module call, or ``None`` if the module is not on the list (or overrides ``forward``)."""
    for table in (_MODULE_RULES, _library_module_rules()):
        rule = table.get(type(m))
        if rule is not None:
            return rule
        for cls, rule in table.items():
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return rule
    return None

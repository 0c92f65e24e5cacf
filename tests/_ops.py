"""A broad list of shape-preserving operations (torch functions, Tensor methods, modules, opaque leaves) to insert
into generated networks (_generated.py, step ``("op", name)``), each with what a strict DLGN conversion must say
of it: ``refused`` is the text the refusal names it by (the op's name), ``None`` for an affine op (accepted).

Every op maps a tensor ``(N, C, H, W)`` to one of the same shape. Whether an op is affine is written here by hand
from its definition; the property test checks it independently (numerical affinity of what is accepted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Op:
    name: str
    apply: Callable[[nn.Module | None, torch.Tensor], torch.Tensor]  # (its module, x) -> y
    make: Callable[[int], nn.Module] | None = None                   # channels -> its module
    refused: str | None = None                                       # text naming it in a refusal


class LeafRelu(nn.Module):
    """A user leaf (``leaf_modules=(LeafRelu,)``) calling F.relu: opaque, so not proven affine."""

    def forward(self, x):
        return F.relu(x) - 0.5 * x


class Buffers(nn.Module):
    """Constant tensors (buffers / parameters) the affine ops combine with the input."""

    def __init__(self, c: int):
        super().__init__()
        g = torch.Generator().manual_seed(c)
        self.w = nn.Parameter(torch.randn(1, c, 1, 1, generator=g))
        self.register_buffer("mask", torch.rand(1, c, 1, 1, generator=g) > 0.5)
        self.register_buffer("perm", torch.randperm(c, generator=g))


class ChannelLSTM(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.lstm = nn.LSTM(c, c, batch_first=True)

    def forward(self, x):
        n, c, h, w = x.shape
        y, _ = self.lstm(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(n, c, h, w)


def _last(f: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable:
    """Apply a channels-last module / function and come back to channels first."""
    return lambda m, x: f(m, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _bn_random(c: int) -> nn.Module:
    bn = nn.BatchNorm2d(c)
    g = torch.Generator().manual_seed(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _setitem(m, x):
    buf = torch.zeros_like(x)
    buf[:, :1] = x[:, :1]
    return buf + x


def _ts(c: int) -> nn.Module:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU()))


AFFINE = [
    Op("mul const", lambda m, x: x * 2.0),
    Op("div const", lambda m, x: x / 3.0),
    Op("sub mean", lambda m, x: x - x.mean((2, 3), keepdim=True)),
    Op("add param", lambda m, x: x + m.w, Buffers),
    Op("mul param", lambda m, x: x.mul(m.w), Buffers),
    Op("torch.add alpha", lambda m, x: torch.add(x, x, alpha=0.5)),
    Op("cat+slice", lambda m, x: torch.cat([x, 2 * x], 1)[:, : x.shape[1]]),
    Op("flip", lambda m, x: x.flip(-1)),
    Op("roll", lambda m, x: torch.roll(x, 1, -1)),
    Op("transpose twice", lambda m, x: x.transpose(2, 3).contiguous().transpose(2, 3)),
    Op("reshape/view_as", lambda m, x: x.reshape(x.shape[0], -1).view_as(x)),
    Op("pad+crop", lambda m, x: F.pad(x, (1, 1, 1, 1), value=0.5)[..., 1:-1, 1:-1]),
    Op("reflect pad+crop", lambda m, x: F.pad(x, (1, 1, 1, 1), mode="replicate")[..., 1:-1, 1:-1]),
    Op("avg_pool", lambda m, x: F.avg_pool2d(x, 3, 1, 1)),
    Op("interpolate", lambda m, x: F.interpolate(x, scale_factor=2.0, mode="bilinear")[..., ::2, ::2]),
    Op("conv", lambda m, x: m(x), lambda c: nn.Conv2d(c, c, 3, padding=1)),
    Op("batch norm", lambda m, x: m(x), _bn_random),
    Op("dropout", lambda m, x: m(x), lambda c: nn.Dropout(0.5)),
    Op("F.dropout(training=False)", lambda m, x: F.dropout(x, 0.3, training=False)),
    Op("identity", lambda m, x: m(x), lambda c: nn.Identity()),
    Op("where const mask", lambda m, x: torch.where(m.mask, x, 2 * x), Buffers),
    Op("masked_fill const mask", lambda m, x: x.masked_fill(m.mask, 1.0), Buffers),
    Op("cumsum", lambda m, x: x.cumsum(-1)),
    Op("einsum with param", lambda m, x: torch.einsum("nchw,c->nchw", x, m.w.flatten()), Buffers),
    Op("index const perm", lambda m, x: x[:, m.perm], Buffers),
    Op("in-place mul_", lambda m, x: x.clone().mul_(3.0)),
    Op("setitem", _setitem),
    Op("to double and back", lambda m, x: x.double().to(x.dtype)),
    Op("lerp to param", lambda m, x: torch.lerp(x, m.w.expand_as(x), 0.3), Buffers),
    Op("upsample+avg", lambda m, x: F.avg_pool2d(m(x), 2), lambda c: nn.Upsample(scale_factor=2)),
    Op("linear over channels", _last(lambda m, x: m(x)), lambda c: nn.Linear(c, c)),
    Op("neg", lambda m, x: -x),
    Op("sub", lambda m, x: torch.sub(x, x.flip(-1))),
]

NONLINEAR = [
    Op("torch.maximum", lambda m, x: torch.maximum(x, 0 * x), refused="torch.maximum"),
    Op("torch.clamp_min", lambda m, x: torch.clamp_min(x, 0.0), refused="torch.clamp_min"),
    Op("masked_fill data mask", lambda m, x: x.masked_fill(x < 0, 0.0), refused="operator.lt"),
    Op("torch.square", lambda m, x: torch.square(x), refused="torch.square"),
    Op("Tensor.sin", lambda m, x: x.sin(), refused="Tensor.sin"),
    Op("F.softshrink", lambda m, x: F.softshrink(x), refused="F.softshrink"),
    Op("torch.sigmoid_", lambda m, x: torch.sigmoid_(x.clone()), refused="torch.sigmoid_"),
    Op("x*x", lambda m, x: x * x, refused="operator.mul of two input-dependent tensors"),
    Op("abs", lambda m, x: x.abs(), refused="Tensor.abs"),
    Op("exp", lambda m, x: torch.exp(x * 0.1), refused="torch.exp"),
    Op("gelu", lambda m, x: F.gelu(x), refused="F.gelu"),
    Op("silu module", lambda m, x: m(x), lambda c: nn.SiLU(), refused="nn.SiLU"),
    Op("lstm", lambda m, x: m(x), ChannelLSTM, refused="nn.LSTM"),
    Op("bilinear", _last(lambda m, x: m(x, x)), lambda c: nn.Bilinear(c, c, c), refused="nn.Bilinear"),
    Op("rmsnorm", _last(lambda m, x: m(x)), lambda c: nn.RMSNorm(c), refused="nn.RMSNorm"),
    Op("layernorm", _last(lambda m, x: m(x)), lambda c: nn.LayerNorm(c), refused="nn.LayerNorm"),
    Op("groupnorm", lambda m, x: m(x), lambda c: nn.GroupNorm(1, c), refused="nn.GroupNorm"),
    Op("bn batch stats", lambda m, x: m(x), lambda c: nn.BatchNorm2d(c, track_running_stats=False),
       refused="nn.BatchNorm2d without running statistics"),
    Op("F.normalize", lambda m, x: F.normalize(x, dim=1), refused="F.normalize"),
    Op("tanh", lambda m, x: torch.tanh(x), refused="torch.tanh"),
    Op("pow", lambda m, x: x.pow(2), refused="Tensor.pow"),
    Op("**3", lambda m, x: x ** 3, refused="operator.pow"),
    Op("sort", lambda m, x: torch.sort(x, -1).values, refused="torch.sort"),
    Op("where data", lambda m, x: torch.where(x > 0, x, 0.1 * x), refused="operator.gt"),
    Op("hardswish", lambda m, x: F.hardswish(x), refused="F.hardswish"),
    Op("floor", lambda m, x: x.floor(), refused="Tensor.floor"),
    Op("round", lambda m, x: torch.round(x), refused="torch.round"),
    Op("softmax", lambda m, x: F.softmax(x, 1), refused="F.softmax"),
    Op("clamp", lambda m, x: torch.clamp(x, -1.0, 1.0), refused="torch.clamp"),
    Op("threshold", lambda m, x: F.threshold(x, 0.1, 0.0), refused="F.threshold"),
    Op("adaptive max pool", lambda m, x: F.adaptive_max_pool2d(x, 1) + x, refused="F.adaptive_max_pool2d"),
    Op("div by data", lambda m, x: x / (x.detach().abs().mean() + 1.0), refused="Tensor.abs"),
    Op("dropout(training=True)", lambda m, x: F.dropout(x, 0.3, training=True), refused="F.dropout with training=True"),
    Op("instance norm", lambda m, x: m(x), lambda c: nn.InstanceNorm2d(c), refused="nn.InstanceNorm2d"),
    Op("torchscript relu", lambda m, x: m(x), _ts, refused="TorchScript module"),
    Op("user leaf relu", lambda m, x: m(x), lambda c: LeafRelu(), refused="opaque leaf module"),
]

OPS = {op.name: op for op in AFFINE + NONLINEAR}

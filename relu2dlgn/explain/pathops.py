"""The ops of the path-sum graph (:mod:`relu2dlgn.explain.pathsum`): gate applications for a *pair* of
examples, average pooling with every ``1/k`` set to 1, and the unit / bias values that replace a linear op's
coefficients and constants.

A pair gate op receives ``g`` (the gates of x) and ``h`` (the gates of x') and multiplies by the product of the
two examples' gates on each edge — the slope of the selected piece for relu / leaky_relu / prelu / hardtanh,
the shared selection for max-pool (see :mod:`relu2dlgn.explain.pathsum` for the conventions). They are
module-level functions so that the generated graph code can refer to them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import gates as G
from ..gates import PoolGeometry, pool_windows


# --------------------------------------------------------------------------------------------------
# gate applications for a pair of examples: g = gates of x, h = gates of x'
# --------------------------------------------------------------------------------------------------

def _slope(g: Tensor, a: Tensor | float) -> Tensor:
    return g + a * (1 - g)


def _per_channel(v: Tensor, w: Tensor) -> Tensor:
    if w.numel() == 1:
        return w.reshape(())
    return w if v.dim() < 2 else w.reshape((1, -1) + (1,) * (v.dim() - 2))


def pair_relu(v: Tensor, g: Tensor, h: Tensor) -> Tensor:
    return v * (g * h)


def pair_relu_(v: Tensor, g: Tensor, h: Tensor) -> Tensor:
    return v.mul_(g * h)


def pair_leaky_relu(v: Tensor, g: Tensor, h: Tensor, a: float) -> Tensor:
    return v * (_slope(g, a) * _slope(h, a))


def pair_leaky_relu_(v: Tensor, g: Tensor, h: Tensor, a: float) -> Tensor:
    return v.mul_(_slope(g, a) * _slope(h, a))


def pair_prelu(v: Tensor, g: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    w = _per_channel(v, weight)
    return v * (_slope(g, w) * _slope(h, w))


def _hardtanh_terms(g: Tensor, h: Tensor, bias: float) -> tuple[Tensor, Tensor]:
    slope = (g[0] - g[1]) * (h[0] - h[1])
    const = ((1 - g[0]) * (1 - h[0]) + g[1] * h[1]) * bias
    return slope, const


def pair_hardtanh(v: Tensor, g: Tensor, h: Tensor, bias: float) -> Tensor:
    slope, const = _hardtanh_terms(g, h, bias)
    return slope * v + const


def pair_hardtanh_(v: Tensor, g: Tensor, h: Tensor, bias: float) -> Tensor:
    slope, const = _hardtanh_terms(g, h, bias)
    return v.mul_(slope).add_(const)


def pair_maxpool(v: Tensor, g: Tensor, h: Tensor, ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool) -> Tensor:
    """Hard gates (arg-max indices): ``v`` at ``g``'s position where ``g == h``, else 0. Soft gates (window
    weights): the window sum of ``v`` weighted by ``g * h``."""
    if not g.is_floating_point():
        picked = G.gate_maxpool(v, g, ndim, kernel_size, stride, padding, dilation, ceil_mode)
        return picked * (g == h).to(v.dtype)
    return G.gate_maxpool(v, g * h, ndim, kernel_size, stride, padding, dilation, ceil_mode)


# --------------------------------------------------------------------------------------------------
# averages become sums; constants become the bias value; coefficients become 1
# --------------------------------------------------------------------------------------------------

def sum_pool(x: Tensor, ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
             dilation: tuple[int, ...], ceil_mode: bool) -> Tensor:
    """The sum over the valid elements of each pooling window (average pooling with every 1/k set to 1).

    Without dilation this is average pooling with divisor 1 (padding adds zeros, the ``ceil_mode`` overhang
    nothing); with dilation the windows are summed explicitly."""
    if all(d == 1 for d in dilation) and ndim in (1, 2, 3):
        if ndim == 1:
            y = F.avg_pool2d(x.unsqueeze(-2), (1, kernel_size[0]), (1, stride[0]), (0, padding[0]), ceil_mode,
                             True, 1)
            return y.squeeze(-2)
        fn = F.avg_pool2d if ndim == 2 else F.avg_pool3d
        return fn(x, kernel_size, stride, padding, ceil_mode, True, 1)
    geo = PoolGeometry(ndim, kernel_size, stride, padding, dilation, ceil_mode)
    return pool_windows(x, geo, 0.0).sum(2)


def _adaptive_counts(size: int, out: int) -> Tensor:
    i = torch.arange(out)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    return (end - start).to(torch.float64)


def adaptive_sum_pool(x: Tensor, output_size: Any, ndim: int) -> Tensor:
    """Adaptive average pooling times each window's element count: the window sums."""
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[ndim]
    y = fn(x, output_size)
    counts = torch.ones((), dtype=torch.float64)
    for d in range(ndim):
        size, out = x.shape[-ndim + d], y.shape[-ndim + d]
        c = _adaptive_counts(size, out).reshape((-1,) + (1,) * (ndim - 1 - d))
        counts = counts * c
    return y * counts.to(device=y.device, dtype=y.dtype)


def bias_like(c: Any, value: float) -> Any:
    """The bias value in place of the constant ``c`` (same shape if ``c`` is a tensor)."""
    return torch.full_like(c, value) if isinstance(c, Tensor) else value


def unit_like(c: Any) -> Any:
    """1 in place of the coefficient ``c`` (same shape if ``c`` is a tensor)."""
    return torch.ones_like(c) if isinstance(c, Tensor) else 1.0

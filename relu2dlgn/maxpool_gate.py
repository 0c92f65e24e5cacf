"""The hard max-pool gate written without index operations: the arg max of every pooling window, and the value
network's read at it, as plain tensor ops that export to ONNX graphs without ``MaxPool``'s ``Indices`` output.

**Gate.** The hard gate of a max-pool site is, for every output position, the *per-plane flat index* of the
window element that wins (an index into the flattened spatial dimensions of one ``(n, c)`` plane) — what
:func:`torch.nn.functional.max_pool2d` returns with ``return_indices=True``. The value network reads its own
tensor there.

**Tie rule** (that of PyTorch's max-pool kernels, CPU and CUDA): the window is scanned in row-major order of its
kernel offsets and an element replaces the running maximum when it is strictly greater than it or NaN; the
running maximum starts at ``-inf`` and the index at the window's first position inside the input. Hence the
first maximum wins, a NaN beats every number and the last NaN wins, positions outside the input (padding,
ceil-mode overhang) never win, and a window whose elements are all ``-inf`` picks its first position inside
the input. Every formulation below follows this rule; the tests compare each with ``max_pool(...,
return_indices=True)`` element for element, ties, infinities and NaN included.

Formulations (any kernel, stride, padding, dilation and ``ceil_mode``, overlapping windows included):

* :func:`argmax_chain` / :func:`select_chain` — the compare-and-select chain over the ``K`` kernel offsets,
  each a strided slice of the padded tensor (``q`` padded with ``-inf``)::

      take = (q_k > best) | isnan(q_k);  best = where(take, q_k, best);  idx = where(take, flat_k, idx)

  and on the value side ``out = where(idx == flat_k, v_k, out)``. ONNX: ``Pad``, ``Slice``, ``Greater``,
  ``IsNaN``, ``Or``, ``Where``, ``Equal`` — exact for every input.
* :func:`argmax_by_equality` — for onnxruntime's CPU provider, whose ``Where`` and strided ``Slice`` kernels are
  slow: the window maximum ``m`` from a plain max-pool, each offset's values from a 1x1 strided depthwise
  convolution with unit weights (one per stride phase, then contiguous slices), and the winner as the largest
  ``1(q_k == m) * w_k`` with ``w_k`` decreasing in the scan order and 0 outside the input. Exact for every
  input without NaN; a window holding a NaN gets an unspecified index inside the window (PyTorch: its last NaN).

The *soft* gate of training, the value network's read under it and the window cross-entropy are in
:mod:`relu2dlgn.soft_maxpool`, over the same window geometry (:func:`kernel_offsets`, :func:`pad_widths`,
:func:`padded`).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .gates import PoolGeometry

__all__ = ["argmax_chain", "select_chain", "argmax_by_equality", "window_flat_indices", "kernel_offsets", "pad_widths",
           "padded"]


# --------------------------------------------------------------------------------------------------
# window constants (numpy, cached per geometry and spatial size)
# --------------------------------------------------------------------------------------------------

def kernel_offsets(geo: "PoolGeometry") -> list[tuple[int, ...]]:
    """Kernel offsets in row-major (scan) order."""
    return list(itertools.product(*(range(k) for k in geo.kernel_size)))


def _coords(geo: "PoolGeometry", size: Sequence[int], out: Sequence[int], offset: Sequence[int]) -> list[np.ndarray]:
    """Per spatial dimension, the input coordinate that ``offset`` reads at each output position."""
    return [np.arange(o) * s - p + k * d
            for o, s, p, k, d in zip(out, geo.stride, geo.padding, offset, geo.dilation)]


@functools.lru_cache(maxsize=256)
def _window_constants(geo: "PoolGeometry", size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(flat, valid, first)`` for a spatial input ``size``: ``flat[k]`` the per-plane flat index that offset ``k``
    reads at each output position (-1 outside the input), ``valid[k]`` whether it is inside, ``first`` the flat
    index of each window's first position inside the input. Shapes ``(K, *out)``, ``(K, *out)``, ``out``."""
    out = geo.output_size(size)
    plane = np.cumprod((1,) + tuple(reversed(size[1:])))[::-1]  # row-major strides of one plane
    flats, valids = [], []
    for offset in kernel_offsets(geo):
        coords = np.meshgrid(*_coords(geo, size, out, offset), indexing="ij")
        valid = np.ones(out, dtype=bool)
        flat = np.zeros(out, dtype=np.int64)
        for c, n, st in zip(coords, size, plane):
            valid &= (c >= 0) & (c < n)
            flat += c * st
        flats.append(np.where(valid, flat, -1))
        valids.append(valid)
    flat, valid = np.stack(flats), np.stack(valids)
    first = np.take_along_axis(flat, valid.argmax(0)[None], 0)[0]  # every window has a position inside
    return flat, valid, first


def window_flat_indices(geo: "PoolGeometry", size: tuple[int, ...]) -> np.ndarray:
    """``(K, *out)`` int64: the per-plane flat index that kernel offset ``k`` reads at each output position for a
    spatial input ``size`` (-1 outside the input); offsets in row-major order, as :func:`F.unfold` numbers them."""
    return _window_constants(geo, tuple(size))[0]


def _const(array: np.ndarray, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``array`` as a tensor shaped ``(1, 1, *array.shape)`` on ``like``'s device (a fresh tensor each call: the
    cache holds numpy arrays only, so nothing made under torch.export's fake tensors is ever reused)."""
    return torch.as_tensor(array, dtype=dtype, device=like.device).reshape((1, 1) + array.shape)


def pad_widths(geo: "PoolGeometry", size: Sequence[int]) -> list[tuple[int, int]]:
    """Per spatial dimension, ``(left, right)`` padding under which every window of an input of spatial ``size``
    (ceil-mode overhang included) lies inside the padded tensor; ``left`` is the pooling's own padding."""
    out = geo.output_size(size)
    widths = []
    for i in range(geo.ndim):
        span = geo.dilation[i] * (geo.kernel_size[i] - 1) + 1
        widths.append((geo.padding[i], max(0, (out[i] - 1) * geo.stride[i] + span - size[i] - geo.padding[i])))
    return widths


def padded(x: Tensor, geo: "PoolGeometry", fill: float) -> Tensor:
    """``x`` (``(N, C, *S)``) padded with ``fill`` so that every window (ceil-mode overhang included) lies inside
    it; ``x`` itself when no padding is needed."""
    pad = [w for left_right in reversed(pad_widths(geo, x.shape[2:])) for w in left_right]  # F.pad: last dim first
    return F.pad(x, pad, value=fill) if any(pad) else x


def _view(xp: Tensor, geo: "PoolGeometry", out: Sequence[int], offset: Sequence[int]) -> Tensor:
    """The elements that kernel ``offset`` reads, one per output position: a strided slice of the padded tensor."""
    index = [slice(None), slice(None)]
    for o, s, k, d in zip(out, geo.stride, offset, geo.dilation):
        index.append(slice(k * d, k * d + (o - 1) * s + 1, s))
    return xp[tuple(index)]


# --------------------------------------------------------------------------------------------------
# the compare-and-select chain (portable)
# --------------------------------------------------------------------------------------------------

def argmax_chain(q: Tensor, geo: "PoolGeometry") -> Tensor:
    """Per-plane arg-max indices of ``q``'s pooling windows (the module docstring's tie rule), by the
    compare-and-select chain. ``q``: ``(N, C, *S)``; returns int64 ``(N, C, *out)``."""
    size = tuple(q.shape[2:])
    out = geo.output_size(size)
    flat, _, first = _window_constants(geo, size)
    qp = padded(q, geo, -math.inf)
    offsets = kernel_offsets(geo)
    best = _view(qp, geo, out, offsets[0])
    idx = _const(first, q)  # broadcast by the first where
    if len(offsets) == 1:
        return idx.expand(best.shape).clone()
    for k in range(1, len(offsets)):
        qk = _view(qp, geo, out, offsets[k])
        take = (qk > best) | torch.isnan(qk)
        best = torch.where(take, qk, best)
        idx = torch.where(take, _const(flat[k], q), idx)
    return idx


def select_chain(v: Tensor, idx: Tensor, geo: "PoolGeometry") -> Tensor:
    """``v`` read at per-plane indices ``idx`` (shaped like the pooled output) by a select chain over the kernel
    offsets: ``out = where(idx == flat_k, v_k, out)`` — no gather."""
    size = tuple(v.shape[2:])
    out = geo.output_size(size)
    flat, _, _ = _window_constants(geo, size)
    vp = padded(v, geo, 0.0)
    offsets = kernel_offsets(geo)
    res = _view(vp, geo, out, offsets[0])
    for k in range(1, len(offsets)):
        res = torch.where(idx == _const(flat[k], v), _view(vp, geo, out, offsets[k]), res)
    return res if len(offsets) > 1 else res.clone()


# --------------------------------------------------------------------------------------------------
# equality with the window maximum (onnxruntime CPU)
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _phase_plan(geo: "PoolGeometry", size: tuple[int, ...]) -> tuple[dict, list]:
    """How to read every kernel offset with unit-weight 1x1 strided convolutions and contiguous slices.

    Per dimension, offset ``k`` reads input coordinate ``s*o + k*d - p = s*(o + a) + r`` (``0 <= r < s``). A
    convolution with stride ``s`` and symmetric zero padding ``P`` (``P + r`` a multiple of ``s``) has
    ``out[j] = x[s*j - P]``, so the offset's values are ``out[j0 : j0 + O]`` with ``j0 = a + (r + P) / s``.
    Returns ``{residues: paddings}`` (one convolution per residue tuple) and, per offset, ``(residues,
    starts)``."""
    out = geo.output_size(size)
    per_dim: list[dict[int, int]] = []   # residue -> padding, per dimension
    reads: list[list[tuple[int, int]]] = []  # per dimension, per k: (residue, a)
    for i in range(geo.ndim):
        s, p, d, n, o = geo.stride[i], geo.padding[i], geo.dilation[i], size[i], out[i]
        dim_reads = [(divmod(k * d - p, s)[1], divmod(k * d - p, s)[0]) for k in range(geo.kernel_size[i])]
        pads = {}
        for r in sorted({r for r, _ in dim_reads}):
            base = (s - r) % s
            pad = base
            while True:  # the smallest padding whose output covers every offset of this residue
                length = (n + 2 * pad - 1) // s + 1
                starts = [a + (r + pad) // s for rr, a in dim_reads if rr == r]
                if min(starts) >= 0 and max(starts) + o <= length:
                    break
                pad += s
            pads[r] = pad
        per_dim.append(pads)
        reads.append(dim_reads)
    convs: dict[tuple[int, ...], tuple[int, ...]] = {}
    plan = []
    for offset in kernel_offsets(geo):
        residues = tuple(reads[i][k][0] for i, k in enumerate(offset))
        pads = tuple(per_dim[i][r] for i, r in enumerate(residues))
        starts = tuple(reads[i][k][1] + (r + pad) // geo.stride[i]
                       for i, (k, r, pad) in enumerate(zip(offset, residues, pads)))
        convs[residues] = pads
        plan.append((residues, starts))
    return convs, plan


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def argmax_by_equality(q: Tensor, geo: "PoolGeometry") -> Tensor:
    """Per-plane arg-max indices of ``q``'s pooling windows by equality with the window maximum (see the module
    docstring; exact for inputs without NaN). ``q``: ``(N, C, *S)``; returns int64 ``(N, C, *out)``.

    A window where no element equals the maximum gets its first position inside the input: that is PyTorch's
    answer for a window of -inf only (onnxruntime's max-pool gives such a window the lowest finite float, which no
    element equals), and an index inside the window for one holding NaN."""
    size = tuple(q.shape[2:])
    out = geo.output_size(size)
    flat, valid, first = _window_constants(geo, size)
    huge = int(np.prod(size)) + 1
    score_dtype = torch.float32 if huge < 2 ** 24 else torch.int64  # integers exact in the score's dtype
    weights = np.where(valid, huge - flat, 0)
    m = _MAX_POOL[geo.ndim](q, geo.kernel_size, geo.stride, geo.padding, geo.dilation, geo.ceil_mode)
    convs, plan = _phase_plan(geo, size)
    ones = torch.ones((q.shape[1], 1) + (1,) * geo.ndim, dtype=q.dtype, device=q.device)
    planes = {r: _CONV[geo.ndim](q, ones, stride=geo.stride, padding=pads, groups=q.shape[1])
              for r, pads in convs.items()}
    score: Tensor | None = None
    for k, (residues, starts) in enumerate(plan):
        if not valid[k].any():
            continue
        view = planes[residues][(slice(None), slice(None)) + tuple(slice(a, a + o) for a, o in zip(starts, out))]
        term = (view == m).to(score_dtype) * _const(weights[k], q, score_dtype)
        score = term if score is None else torch.maximum(score, term)
    assert score is not None  # every window has a position inside the input
    unmatched = (score == 0).to(score_dtype) * _const(huge - first, q, score_dtype)
    return (huge - score - unmatched).to(torch.int64)

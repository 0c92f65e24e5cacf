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

The *soft* gate of training (:func:`soft_gate`: the soft-max over each window of ``beta q``) and the value
network's read under it (:func:`soft_select`) are autograd functions over the stride phases of the padded
tensor, where every kernel offset reads a contiguous block: no ``unfold``/``fold`` copies of the windows.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .gates import PoolGeometry

__all__ = ["argmax_chain", "select_chain", "argmax_by_equality", "window_flat_indices", "soft_gate", "soft_select",
           "window_cross_entropy", "padded"]


# --------------------------------------------------------------------------------------------------
# window constants (numpy, cached per geometry and spatial size)
# --------------------------------------------------------------------------------------------------

def _offsets(geo: "PoolGeometry") -> list[tuple[int, ...]]:
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
    for offset in _offsets(geo):
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


def _pad_widths(geo: "PoolGeometry", size: Sequence[int]) -> list[tuple[int, int]]:
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
    pad = [w for left_right in reversed(_pad_widths(geo, x.shape[2:])) for w in left_right]  # F.pad: last dim first
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
    offsets = _offsets(geo)
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
    offsets = _offsets(geo)
    res = _view(vp, geo, out, offsets[0])
    for k in range(1, len(offsets)):
        res = torch.where(idx == _const(flat[k], v), _view(vp, geo, out, offsets[k]), res)
    return res if len(offsets) > 1 else res.clone()


# --------------------------------------------------------------------------------------------------
# the soft gate's read (training)
# --------------------------------------------------------------------------------------------------

def _phase_reads(geo: "PoolGeometry") -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per kernel offset (scan order), ``(residues, starts)``: in the padded tensor, offset ``k`` reads coordinate
    ``s*o + k*d = s*(o + a) + r`` per dimension, i.e. elements ``a .. a + out`` of the stride phase ``r``."""
    return [(tuple((k * d) % s for k, d, s in zip(offset, geo.dilation, geo.stride)),
             tuple((k * d) // s for k, d, s in zip(offset, geo.dilation, geo.stride))) for offset in _offsets(geo)]


def _phase_index(geo: "PoolGeometry", residues: tuple[int, ...]) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(r, None, s) for r, s in zip(residues, geo.stride))


def _window(phase: Tensor, starts: tuple[int, ...], out: Sequence[int]) -> Tensor:
    return phase[(slice(None), slice(None)) + tuple(slice(a, a + o) for a, o in zip(starts, out))]


class _SoftSelect(torch.autograd.Function):
    """``out = sum_k g[:, :, k] * v_k`` with ``v_k`` what kernel offset ``k`` reads from the zero-padded ``v``:
    the padded tensor is split once into its stride phases (``s_1 * s_2 * ...`` contiguous planes), where every
    offset reads a contiguous block, and each offset is one multiply-add on output-sized tensors — instead of
    unfolding ``v`` into a ``(N, C, K, *out)`` copy and multiplying and summing that (and again for the
    gradients)."""

    @staticmethod
    def forward(ctx, v: Tensor, g: Tensor, geo: "PoolGeometry") -> Tensor:  # type: ignore[override]
        ctx.geo, ctx.size = geo, tuple(v.shape[2:])
        ctx.save_for_backward(v, g)
        out_size = geo.output_size(ctx.size)
        phases = _phases(padded(v, geo, 0.0), geo)
        out = torch.zeros(g.shape[:2] + out_size, dtype=torch.result_type(v, g), device=v.device)
        for k, (residues, starts) in enumerate(_phase_reads(geo)):
            out.addcmul_(g[:, :, k], _window(phases[residues], starts, out_size))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        v, g = ctx.saved_tensors
        geo = ctx.geo
        out_size = geo.output_size(ctx.size)
        grad = grad.contiguous()
        grad_v = grad_g = None
        if ctx.needs_input_grad[1]:
            phases = _phases(padded(v, geo, 0.0), geo)
            grad_g = torch.empty_like(g)
            for k, (residues, starts) in enumerate(_phase_reads(geo)):
                torch.mul(grad, _window(phases[residues], starts, out_size), out=grad_g[:, :, k])
        if ctx.needs_input_grad[0]:
            grad_v = _fold(geo, ctx.size, grad, lambda k, block: block.addcmul_(grad, g[:, :, k])).to(v.dtype)
        return grad_v, grad_g, None


def _phases(xp: Tensor, geo: "PoolGeometry", copy: bool = True) -> dict[tuple[int, ...], Tensor]:
    """The stride phases of the padded ``xp`` that the kernel offsets read, contiguous (views with ``copy=False``;
    the tensor itself for unit strides)."""
    out = {}
    for residues, _ in _phase_reads(geo):
        if residues not in out:
            view = xp[_phase_index(geo, residues)]
            out[residues] = view.contiguous() if copy else view
    return out


def _fold(geo: "PoolGeometry", size: tuple[int, ...], like: Tensor,
          add: Callable[[int, Tensor], object]) -> Tensor:
    """The gradient of an input of spatial ``size`` from per-offset contributions (the adjoint of reading the
    windows): ``add(k, block)`` adds kernel offset ``k``'s output-sized contribution into ``block``, the part of
    its stride phase that offset reads; the phases are then written back into the padded gradient, whose padding
    is dropped. Shape ``like.shape[:2] + size``, ``like``'s dtype and device."""
    widths = _pad_widths(geo, size)
    grad = torch.zeros(like.shape[:2] + tuple(n + left + right for n, (left, right) in zip(size, widths)),
                       dtype=like.dtype, device=like.device)
    phases = {r: torch.zeros_like(p) for r, p in _phases(grad, geo, copy=False).items()}
    out = geo.output_size(size)
    for k, (residues, starts) in enumerate(_phase_reads(geo)):
        add(k, _window(phases[residues], starts, out))
    for residues, phase in phases.items():
        grad[_phase_index(geo, residues)] = phase
    return grad[(slice(None), slice(None)) + tuple(slice(left, left + n) for n, (left, _) in zip(size, widths))]


class _SoftGate(torch.autograd.Function):
    """``softmax`` over each pooling window of ``z``, ``(N, C, K, *out)`` (padding and overhang weigh 0): the
    windows are copied out of the stride phases of the ``-inf``-padded ``z`` into one buffer, which the soft-max
    then overwrites in place; the backward accumulates each offset's gradient into the phases — no ``unfold`` /
    ``fold``, one ``(N, C, K, *out)`` tensor each way."""

    @staticmethod
    def forward(ctx, z: Tensor, geo: "PoolGeometry") -> Tensor:  # type: ignore[override]
        ctx.geo, ctx.size = geo, tuple(z.shape[2:])
        out_size = geo.output_size(ctx.size)
        reads = _phase_reads(geo)
        phases = _phases(padded(z, geo, -math.inf), geo)
        g = torch.empty(z.shape[:2] + (len(reads),) + out_size, dtype=z.dtype, device=z.device)
        for k, (residues, starts) in enumerate(reads):
            g[:, :, k].copy_(_window(phases[residues], starts, out_size))
        g.sub_(g.amax(2, keepdim=True)).exp_()
        g.div_(g.sum(2, keepdim=True))
        ctx.save_for_backward(g)
        return g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (g,) = ctx.saved_tensors
        grad_w = torch.ops.aten._softmax_backward_data(grad, g, 2, g.dtype)  # g * (grad - sum_k g_k grad_k)
        return _fold(ctx.geo, ctx.size, grad_w, lambda k, block: block.add_(grad_w[:, :, k])), None


class _WindowCE(torch.autograd.Function):
    """``mean_o (logsumexp_k z[o, k] - z[o, t_o])`` for ``z = beta q``, from the soft gate ``g = softmax_k z`` that
    the forward pass made: the value as ``beta (q_m - q_t) - log g_m`` (``m`` the window's arg max, ``g_m`` its
    largest weight: stable, as ``g_m >= 1/K``), the gradient ``beta (fold(g) - onehot(t)) / n`` straight into
    ``q`` — the adjoint of the window read applied to ``g``, the target subtracted by one scatter; nothing of the
    gate's ``(N, C, K, *out)`` size is made."""

    @staticmethod
    def forward(ctx, q: Tensor, g: Tensor, top: Tensor, target: Tensor,  # type: ignore[override]
                beta: float, geo: "PoolGeometry") -> Tensor:
        g = g.float()
        picked = q.flatten(2).gather(2, target.flatten(2)).view(target.shape)
        ctx.save_for_backward(g, target)
        ctx.beta, ctx.geo, ctx.size, ctx.dtype = beta, geo, tuple(q.shape[2:]), q.dtype
        return (beta * (top - picked) - g.amax(2).log()).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:  # type: ignore[override]
        g, target = ctx.saved_tensors
        grad_q = _fold(ctx.geo, ctx.size, g, lambda k, block: block.add_(g[:, :, k])).contiguous()
        index = target.flatten(2)
        grad_q.view(index.shape[:2] + (-1,)).scatter_add_(2, index, g.new_full((1, 1, 1), -1.0).expand(index.shape))
        grad_q.mul_(grad * ctx.beta / max(target.numel(), 1))
        return grad_q.to(ctx.dtype), None, None, None, None, None


def window_cross_entropy(q: Tensor, g: Tensor, top: Tensor, target: Tensor, beta: float,
                         geo: "PoolGeometry") -> Tensor:
    """The mean cross-entropy of every pooling window's soft-max ``softmax(beta q_window)`` against the per-plane
    flat index ``target`` (``(N, C, *out)``, each inside its window), given the soft gate ``g = soft_gate(beta q,
    geo)`` of the same ``beta`` and the window maxima ``top`` (``max_pool(q)``): what ``cross_entropy`` of
    ``pool_windows(beta q, geo, -inf)`` against the targets' kernel offsets computes, without a second pass over
    the windows. Differentiable in ``q`` only (``g`` and ``top`` are read as values); once differentiable."""
    return _WindowCE.apply(q, g.detach(), top.detach(), target, beta, geo)


def soft_gate(z: Tensor, geo: "PoolGeometry") -> Tensor:
    """The soft max-pool gate for logits ``z`` (``beta q``): ``softmax`` over each pooling window, ``(N, C, K,
    *out)`` with the window axis in row-major kernel order (:func:`relu2dlgn.gates.pool_windows`' layout;
    positions outside the input weigh 0) — what ``softmax(pool_windows(z, geo, -inf), 2)`` computes, faster.
    Once differentiable (a double backward raises)."""
    return _SoftGate.apply(z, geo)


def soft_select(v: Tensor, g: Tensor, geo: "PoolGeometry") -> Tensor:
    """The value network's read under a soft max-pool gate: ``out[o] = sum_k g[:, :, k, o] v[window(o)_k]``
    (``g``: ``(N, C, K, *out)`` window weights, offsets in row-major order; positions outside ``v`` read 0) —
    what ``(pool_windows(v, geo, 0) * g).sum(2)`` computes, in a fraction of its time and memory. Once
    differentiable (a double backward raises)."""
    return _SoftSelect.apply(v, g, geo)


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
    for offset in _offsets(geo):
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

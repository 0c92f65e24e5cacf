"""The soft max-pool gate of training, as autograd functions over the stride phases of the padded tensor.

For ``z = beta q`` the soft gate of a max-pool site is the soft-max over every pooling window,
``softmax(pool_windows(z, geo, -inf), 2)`` (``(N, C, K, *out)``, window axis in row-major kernel order, positions
outside the input weigh 0), and the value network reads ``out[o] = sum_k g[:, :, k, o] v[window(o)_k]``. Here
the padded tensor is split once into its stride phases (``s_1 * s_2 * ...`` contiguous planes), in which every
kernel offset reads a contiguous block: no ``unfold``/``fold`` copies of the windows, each way.

* :func:`soft_gate` — the window soft-max (on the CPU taken in place over the window buffer);
* :func:`soft_select` — the value network's read under it. Reading :func:`soft_gate`'s own output, it sends the
  gradient to ``q`` directly, as ``dL/dz_k = g_k grad (v_k - out)``: no gradient of the ``(N, C, K, *out)`` gate
  and no soft-max backward over one (the gate's other uses, if any, still reach ``q`` through :func:`soft_gate`);
* :func:`window_cross_entropy` — the gate-agreement loss of a max-pool site (each window's soft-max against the
  teacher's arg max), from the forward's gate.

All three are once differentiable (a double backward raises). The window geometry (kernel offsets in scan order,
padding) is :mod:`relu2dlgn.maxpool_gate`'s.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from .maxpool_gate import kernel_offsets, pad_widths, padded

if TYPE_CHECKING:
    from .gates import PoolGeometry

__all__ = ["soft_gate", "soft_select", "window_cross_entropy"]


def _phase_reads(geo: "PoolGeometry") -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per kernel offset (scan order), ``(residues, starts)``: in the padded tensor, offset ``k`` reads coordinate
    ``s*o + k*d = s*(o + a) + r`` per dimension, i.e. elements ``a .. a + out`` of the stride phase ``r``."""
    return [(tuple((k * d) % s for k, d, s in zip(offset, geo.dilation, geo.stride)),
             tuple((k * d) // s for k, d, s in zip(offset, geo.dilation, geo.stride))) for offset in kernel_offsets(geo)]


def _phase_index(geo: "PoolGeometry", residues: tuple[int, ...]) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(r, None, s) for r, s in zip(residues, geo.stride))


def _window(phase: Tensor, starts: tuple[int, ...], out: Sequence[int]) -> Tensor:
    return phase[(slice(None), slice(None)) + tuple(slice(a, a + o) for a, o in zip(starts, out))]


def _read(v: Tensor, g: Tensor, geo: "PoolGeometry") -> tuple[Tensor, dict[tuple[int, ...], Tensor]]:
    """``sum_k g[:, :, k] * v_k``, one multiply-add per kernel offset over the stride phases of the zero-padded
    ``v``; and those phases."""
    out_size = geo.output_size(tuple(v.shape[2:]))
    phases = _phases(padded(v, geo, 0.0), geo)
    out = torch.zeros(g.shape[:2] + out_size, dtype=torch.result_type(v, g), device=v.device)
    for k, (residues, starts) in enumerate(_phase_reads(geo)):
        out.addcmul_(g[:, :, k], _window(phases[residues], starts, out_size))
    return out, phases


def _value_grad(geo: "PoolGeometry", size: tuple[int, ...], grad: Tensor, g: Tensor) -> Tensor:
    """The gradient of the read ``sum_k g[:, :, k] * v_k`` in ``v`` (spatial ``size``): each offset's
    ``grad * g[:, :, k]`` folded back onto the positions it read."""
    return _fold(geo, size, grad, lambda k, block: block.addcmul_(grad, g[:, :, k]))


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
        return _read(v, g, geo)[0]

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
            grad_g = torch.empty((g.shape[2],) + g.shape[:2] + g.shape[3:], dtype=g.dtype, device=g.device)
            for k, (residues, starts) in enumerate(_phase_reads(geo)):
                torch.mul(grad, _window(phases[residues], starts, out_size), out=grad_g[k])
            grad_g = grad_g.movedim(0, 2)  # offset-major, as soft_gate makes g
        if ctx.needs_input_grad[0]:
            grad_v = _value_grad(geo, ctx.size, grad, g).to(v.dtype)
        return grad_v, grad_g, None


class _SoftPool(torch.autograd.Function):
    """``out = sum_k g_k v_k`` for the soft gate ``g = softmax_k(beta q_k)`` that :func:`soft_gate` made of ``q``,
    differentiable in ``v`` and straight in ``q``: as ``sum_j g_j dL/dg_j = grad * out``, the soft-max's backward
    through the read is ``dL/d(beta q_k) = g_k grad (v_k - out)``, one multiply-add per offset folded onto ``q`` —
    no ``(N, C, K, *out)`` gradient of the gate, and no soft-max backward over one."""

    @staticmethod
    def forward(ctx, v: Tensor, q: Tensor, g: Tensor, beta: float,  # type: ignore[override]
                geo: "PoolGeometry") -> Tensor:
        out, phases = _read(v, g, geo)
        ctx.residues = list(phases)
        # the phases of v (what the backward reads of it) and a copy of out, which may be changed in place downstream
        ctx.save_for_backward(g, out.clone(), *phases.values())
        ctx.geo, ctx.size, ctx.beta, ctx.dtypes = geo, tuple(v.shape[2:]), beta, (v.dtype, q.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:  # type: ignore[override]
        g, out, *saved = ctx.saved_tensors
        phases = dict(zip(ctx.residues, saved))
        geo, size = ctx.geo, ctx.size
        out_size = geo.output_size(size)
        grad = grad.contiguous()
        grad_v = grad_q = None
        if ctx.needs_input_grad[0]:
            grad_v = _value_grad(geo, size, grad, g).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            reads = _phase_reads(geo)
            gg, diff = torch.empty_like(grad), torch.empty_like(grad)

            def add(k: int, block: Tensor) -> None:
                residues, starts = reads[k]
                torch.mul(g[:, :, k], grad, out=gg)
                torch.sub(_window(phases[residues], starts, out_size), out, out=diff)
                block.addcmul_(gg, diff, value=ctx.beta)

            grad_q = _fold(geo, size, grad, add).to(ctx.dtypes[1])
        return grad_v, grad_q, None, None, None


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
    widths = pad_widths(geo, size)
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
    """``softmax`` over each pooling window of ``z = beta q``, ``(N, C, K, *out)`` (padding and overhang weigh 0):
    the windows of ``beta q`` are written out of the stride phases of the ``-inf``-padded ``q`` into one buffer, of
    which the soft-max is taken; the backward accumulates each offset's gradient into the phases — no ``unfold`` /
    ``fold``, one ``(N, C, K, *out)`` tensor each way. The buffers are offset-major (``(K, N, C, *out)`` in memory,
    the gate returned as its ``(N, C, K, *out)`` view), so that every per-offset read and write here, in
    :class:`_SoftSelect` and in :class:`_WindowCE` is of one contiguous block (a third faster, forward and
    backward, than the window axis in the middle)."""

    @staticmethod
    def forward(ctx, q: Tensor, beta: float, geo: "PoolGeometry") -> Tensor:  # type: ignore[override]
        ctx.geo, ctx.size, ctx.beta = geo, tuple(q.shape[2:]), beta
        out_size = geo.output_size(ctx.size)
        reads = _phase_reads(geo)
        phases = _phases(padded(q, geo, -math.inf), geo)
        windows = torch.empty((len(reads),) + q.shape[:2] + out_size, dtype=q.dtype, device=q.device)
        for k, (residues, starts) in enumerate(reads):
            torch.mul(_window(phases[residues], starts, out_size), beta, out=windows[k])  # -inf stays -inf: beta > 0
        # one kernel (twice as fast as max, exp, sum and divide as passes); on the CPU in place, whose kernel reads
        # a position's K inputs before it writes them (test_soft_gate_in_place): a second (K, N, C, *out) buffer
        # each step fragmented glibc's heap (~2,000 page faults, ~25 ms, every few steps of resnet18's training)
        cpu = windows.device.type == "cpu"
        g = torch._softmax(windows, 0, False, out=windows) if cpu else torch.softmax(windows, 0)
        ctx.save_for_backward(g)
        return g.movedim(0, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (g,) = ctx.saved_tensors  # offset-major
        grad = grad.movedim(2, 0).contiguous()
        grad_w = torch.ops.aten._softmax_backward_data(grad, g, 0, g.dtype)  # g * (grad - sum_k g_k grad_k)
        return _fold(ctx.geo, ctx.size, grad_w[0], lambda k, block: block.add_(grad_w[k], alpha=ctx.beta)), None, None


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
    flat index ``target`` (``(N, C, *out)``, each inside its window), given the soft gate ``g = soft_gate(q, geo,
    beta)`` of the same ``beta`` and the window maxima ``top`` (``max_pool(q)``): what ``cross_entropy`` of
    ``pool_windows(beta q, geo, -inf)`` against the targets' kernel offsets computes, without a second pass over
    the windows. Differentiable in ``q`` only (``g`` and ``top`` are read as values); once differentiable."""
    return _WindowCE.apply(q, g.detach(), top.detach(), target, beta, geo)


def soft_gate(q: Tensor, geo: "PoolGeometry", beta: float = 1.0) -> Tensor:
    """The soft max-pool gate of pre-activation ``q`` at inverse temperature ``beta > 0``: ``softmax`` of ``beta q``
    over each pooling window, ``(N, C, K, *out)`` with the window axis in row-major kernel order
    (:func:`relu2dlgn.gates.pool_windows`' layout; positions outside the input weigh 0) — what
    ``softmax(pool_windows(beta * q, geo, -inf), 2)`` computes, faster. The result is a non-contiguous view of an
    offset-major buffer (``g[:, :, k]`` is contiguous). Once differentiable (a double backward raises).

    Raises ``ValueError`` for ``beta <= 0`` (the padding's ``-inf`` logits would not stay ``-inf``)."""
    if not beta > 0:
        raise ValueError(f"soft_gate: beta must be positive, got {beta!r}")
    g = _SoftGate.apply(q, float(beta), geo)
    if g.grad_fn is not None:  # what soft_select needs to send its gradient to q directly
        g.grad_fn.gate_of = (q, float(beta), g._version)
    return g


def soft_select(v: Tensor, g: Tensor, geo: "PoolGeometry") -> Tensor:
    """The value network's read under a soft max-pool gate: ``out[o] = sum_k g[:, :, k, o] v[window(o)_k]``
    (``g``: ``(N, C, K, *out)`` window weights, offsets in row-major order; positions outside ``v`` read 0) —
    what ``(pool_windows(v, geo, 0) * g).sum(2)`` computes, in a fraction of its time and memory. Once
    differentiable (a double backward raises). ``g`` as :func:`soft_gate` returned it (not changed in place since):
    the gradient goes straight to that gate's ``q`` (the module docstring); any other ``g`` gets its own."""
    made = getattr(g.grad_fn, "gate_of", None)  # g is soft_gate's output, unchanged since
    if made is not None and made[2] == g._version and torch.is_grad_enabled():
        q, beta, _ = made
        return _SoftPool.apply(v, q, g.detach(), beta, geo)
    return _SoftSelect.apply(v, g, geo)

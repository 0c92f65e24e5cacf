"""Gate arithmetic: turning a pre-activation into a gate, and applying a gate to a value.

Every piecewise-linear activation ``phi`` is written as ``phi(q) = slope(g) * q + const(g)`` where the
gate ``g`` says which linear piece the pre-activation ``q`` is in.  The gating network computes ``q``;
the value network applies the selected piece to its *own* value ``v``:

===========  ======================================  =========================  ========================================
kind         hard gate (eval; ``bool``)              soft gate (train)          value network: hard | soft gate
===========  ======================================  =========================  ========================================
relu         on = not(q <= 0)                        sigmoid(beta q)            where(g, v, 0) | v * g
leaky_relu   on = not(q <= 0)                        sigmoid(beta q)            where(g, v, a v) | v * (g + a (1 - g))
prelu        on = not(q <= 0)                        sigmoid(beta q)            where(g, v, w v) | v * (g + w (1 - g))
hardtanh     [not(q <= lo), q > hi], stacked         the two sigmoids, stacked  where(g1, hi, where(g0, v, lo)) |
                                                                                (g0 - g1) v + (1 - g0) lo + g1 hi
maxpool      per-plane arg-max index (int64)         softmax(beta q) over each  v at the index | window-weighted sum
                                                     window, (N, C, K, *out)
===========  ======================================  =========================  ========================================

ReLU6 is hardtanh(0, 6); ``w`` is PReLU's per-channel weight (dim 1).

**Exactness and ties.** A hard gate is on unless ``q <= 0``: ``q = 0`` (and ``-0``) is off, ``NaN`` is on. With
``where`` selecting a piece (rather than multiplying by a 0/1 mask, where ``0 * inf`` would be NaN), each hard row
with ``v == q`` reproduces ``phi(q)`` bit for bit for every float, infinities and NaN included: ``relu(NaN) =
NaN``, ``hardtanh(inf) = hi``, and ``leaky_relu(-inf)`` with slope 0 is NaN in the source and here alike. That is
what makes a DGN with the source weights and value input ``x`` equal to the source network. The max-pool gate's
tie rule is PyTorch's (the first maximum in row-major window order; NaN wins, the last NaN; padding never):
see :mod:`relu2dlgn.maxpool_gate`.

**Formulations.** Hard max-pool gates can be computed three ways with identical results (:func:`gate_form`):
``"eager"`` (PyTorch's max-pool with indices and ``gather``, the default), ``"portable"`` (the
compare-and-select chain: no index op) and ``"onnx"`` (equality with the window maximum, for onnxruntime's CPU
provider; not NaN-exact). ONNX export picks one while it traces; everything else runs ``"eager"``.

The functions here are module-level so that torch.fx code generation and pickling can refer to them.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import maxpool_gate, soft_maxpool
from .errors import OptionError
from .types import GateKind
from .utils.fx import fx_leaf

GateForm = Literal["eager", "portable", "onnx"]
"""How hard max-pool gates are computed (same results): PyTorch's kernels, the index-free chain, or equality
with the window maximum (see the module docstring)."""

_FORM: contextvars.ContextVar[str] = contextvars.ContextVar("relu2dlgn_gate_form", default="eager")


@contextlib.contextmanager
def gate_form(form: GateForm) -> Iterator[None]:
    """Compute hard max-pool gates (and read the value network's tensor at them) in ``form`` inside the block."""
    if form not in ("eager", "portable", "onnx"):
        raise OptionError(f"gate form must be 'eager', 'portable' or 'onnx', got {form!r}")
    token = _FORM.set(form)
    try:
        yield
    finally:
        _FORM.reset(token)


@dataclass(frozen=True)
class PoolGeometry:
    """Geometry of a max-pooling call site, normalised to one entry per spatial dimension."""

    ndim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool

    @staticmethod
    def make(ndim: int, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
             ceil_mode: bool = False) -> "PoolGeometry":
        def tup(v: Any) -> tuple[int, ...]:
            if isinstance(v, (tuple, list)):
                if len(v) == 1:
                    return (int(v[0]),) * ndim
                if len(v) != ndim:
                    raise ValueError(f"expected {ndim} values, got {v!r}")
                return tuple(int(x) for x in v)
            return (int(v),) * ndim

        k = tup(kernel_size)
        s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else tup(stride)
        return PoolGeometry(ndim, k, s, tup(padding), tup(dilation), bool(ceil_mode))

    def output_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """PyTorch's max-pool output size for spatial ``size``."""
        out = []
        for L, k, s, p, d in zip(size, self.kernel_size, self.stride, self.padding, self.dilation):
            num = L + 2 * p - d * (k - 1) - 1
            o = (-(-num // s) if self.ceil_mode else num // s) + 1
            if self.ceil_mode and (o - 1) * s >= L + p:
                o -= 1
            out.append(o)
        return tuple(out)

    def as_dict(self) -> dict[str, Any]:
        return {"ndim": self.ndim, "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation), "ceil_mode": self.ceil_mode}


@dataclass(frozen=True)
class GateSpec:
    """What a gate computation needs to know about its site (independent of the graphs)."""

    kind: GateKind
    lo: float = 0.0
    hi: float = 0.0
    pool: PoolGeometry | None = None



# --------------------------------------------------------------------------------------------------
# pre-activation -> gate
# --------------------------------------------------------------------------------------------------

def step(q: Tensor, beta: float, hard: bool) -> Tensor:
    """``not(q <= 0)`` as ``bool`` (hard: off at 0, on at NaN) or ``sigmoid(beta * q)`` in ``q``'s dtype (soft)."""
    if hard:
        return ~(q <= 0)
    return torch.sigmoid(q * beta)


def make_gate(spec: GateSpec, q: Tensor, beta: float, hard: bool) -> Tensor:
    """The gate tensor the value network consumes for one site, from that site's pre-activation (see the table in
    the module docstring)."""
    kind = spec.kind
    if kind in ("relu", "leaky_relu", "prelu"):
        return step(q, beta, hard)
    if kind == "hardtanh":
        if hard:  # compared with the bounds directly: q - lo could round to 0 or overflow
            return torch.stack([~(q <= spec.lo), q > spec.hi])
        return torch.stack([step(q - spec.lo, beta, False), step(q - spec.hi, beta, False)])
    if kind == "maxpool":
        geo = spec.pool
        assert geo is not None
        if hard:
            return hard_maxpool_gate(q, geo)
        if torch.compiler.is_compiling():  # inductor fuses the plain ops; it cannot see into the autograd function
            return torch.softmax(pool_windows(q * beta, geo, float("-inf")), dim=2)
        if isinstance(beta, Tensor):  # a 0-d tensor, possibly with a gradient of its own
            return soft_maxpool.soft_gate(q * beta, geo)
        return soft_maxpool.soft_gate(q, geo, beta)
    raise ValueError(f"unknown gate kind {kind!r}")


def hard_maxpool_gate(q: Tensor, geo: PoolGeometry) -> Tensor:
    """Per-plane arg-max indices of ``q``'s pooling windows, in the current :func:`gate_form`."""
    form = _FORM.get()
    if form == "portable":
        return maxpool_gate.argmax_chain(q, geo)
    if form == "onnx":
        return maxpool_gate.argmax_by_equality(q, geo)
    return max_pool_with_indices(q, geo)[1]


def max_pool_with_indices(q: Tensor, geo: PoolGeometry) -> tuple[Tensor, Tensor]:
    """``(values, per-plane arg-max indices)`` of PyTorch's max-pool, contiguous like ``q``.

    On the CPU a contiguous 4-d input is pooled in channels-last layout: the same kernel rule (first maximum,
    NaN wins) and the same results, several times faster than the NCHW kernel even with both layout copies."""
    fn = _max_pool_fn(geo.ndim)
    args = (geo.kernel_size, geo.stride, geo.padding, geo.dilation, geo.ceil_mode)
    if q.device.type == "cpu" and q.dim() == 4 and q.is_contiguous() and q.shape[1] > 1:
        values, indices = fn(_channels_last(q), *args, return_indices=True)
        return values.contiguous(), indices.contiguous()
    return fn(q, *args, return_indices=True)


def _channels_last(x: Tensor, block: int = 16) -> Tensor:
    """A contiguous NCHW ``x`` copied channels-last. Where one channel's plane is a multiple of 4 KiB (32x32 floats,
    64x64, ...) a copy across all channels reads addresses that share cache sets, and ``block`` channels at a time
    is faster (32x64x32x32 floats, one thread: 1.3 ms against 3.4 ms); otherwise it is one copy."""
    if x.shape[1] <= block or (x[0, 0].numel() * x.element_size()) % 4096:
        return x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    for c in range(0, x.shape[1], block):
        out[:, c:c + block].copy_(x[:, c:c + block])
    return out


# --------------------------------------------------------------------------------------------------
# gate applied to a value (these are the call targets the value graph contains)
# --------------------------------------------------------------------------------------------------

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _bitwise(g: Tensor, v: Tensor, other: Tensor | None = None) -> bool:
    """Whether ``where(g, v, other)`` runs as integer bit operations on the floats' bit patterns (:func:`_select`):
    in eager mode on the CPU without autograd, where ``torch.where``'s kernel is ~20x slower than the bit passes
    (measured: 2.3 ms against 0.1 ms for 32x64x16x16 float32); traced, compiled and exported graphs keep
    ``where``, and so does a value that needs a gradient (hard gates in training: ``freeze_gating``)."""
    return (v.device.type == "cpu" and v.dtype in _BITS and g.dtype == torch.bool and _FORM.get() == "eager"
            and (other is None or other.dtype == v.dtype)
            and not (torch.is_grad_enabled() and (v.requires_grad or (other is not None and other.requires_grad)))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.jit.is_scripting())


def _select(g: Tensor, v: Tensor, other: Tensor | None = None, inplace: bool = False) -> Tensor:
    """``where(g, v, other)`` (``other`` None: +0) bit for bit — each element is one operand's bit pattern, so NaN,
    infinities and -0 pass unchanged — as ``v & m`` or ``other ^ ((v ^ other) & m)``, ``m`` all ones where ``g``;
    ``inplace``: written into ``v`` (the shapes must then broadcast to ``v``'s)."""
    bits = _BITS[v.dtype]
    mask = g.view(torch.uint8).to(bits).neg_()
    vb = v.view(bits)
    if other is None:
        res = vb.bitwise_and_(mask) if inplace else torch.bitwise_and(vb, mask)
    else:
        ob = other.view(bits)
        res = (vb.bitwise_xor_(ob) if inplace else torch.bitwise_xor(vb, ob)).bitwise_and_(mask).bitwise_xor_(ob)
    return v if inplace else res.view(v.dtype)


@fx_leaf
def gate_relu(v: Tensor, g: Tensor) -> Tensor:
    if g.dtype == torch.bool:
        return _select(g, v) if _bitwise(g, v) else torch.where(g, v, 0.0)
    return v * g


@fx_leaf
def gate_relu_(v: Tensor, g: Tensor) -> Tensor:
    if g.dtype == torch.bool:
        if _bitwise(g, v) and torch.broadcast_shapes(g.shape, v.shape) == v.shape:
            return _select(g, v, inplace=True)
        return v.copy_(torch.where(g, v, 0.0))
    return v.mul_(g)


def _slope(g: Tensor, a: Tensor | float) -> Tensor:
    return g + a * (1 - g)


def _piece(g: Tensor, v: Tensor, a: Tensor | float, inplace: bool) -> Tensor:
    """``where(g, v, a v)`` (written into ``v`` when ``inplace``)."""
    off = v * a
    if _bitwise(g, v, off) and torch.broadcast_shapes(g.shape, v.shape, off.shape) == v.shape:
        return _select(g, v, off, inplace)
    res = torch.where(g, v, off)
    return v.copy_(res) if inplace else res


@fx_leaf
def gate_leaky_relu(v: Tensor, g: Tensor, negative_slope: float) -> Tensor:
    if g.dtype == torch.bool:
        return _piece(g, v, negative_slope, False)
    return v * _slope(g, negative_slope)


@fx_leaf
def gate_leaky_relu_(v: Tensor, g: Tensor, negative_slope: float) -> Tensor:
    if g.dtype == torch.bool:
        return _piece(g, v, negative_slope, True)
    return v.mul_(_slope(g, negative_slope))


def _prelu_weight(v: Tensor, weight: Tensor) -> Tensor:
    if weight.numel() == 1:
        return weight.reshape(())
    if v.dim() < 2:
        return weight
    return weight.reshape((1, -1) + (1,) * (v.dim() - 2))


@fx_leaf
def gate_prelu(v: Tensor, g: Tensor, weight: Tensor) -> Tensor:
    w = _prelu_weight(v, weight)
    if g.dtype == torch.bool:
        return _piece(g, v, w, False)
    return v * _slope(g, w)


@fx_leaf
def gate_hardtanh(v: Tensor, g: Tensor, lo: float, hi: float) -> Tensor:
    g0, g1 = g[0], g[1]
    if g.dtype == torch.bool:
        return torch.where(g1, hi, torch.where(g0, v, lo))
    return (g0 - g1) * v + ((1 - g0) * lo + g1 * hi)


@fx_leaf
def gate_hardtanh_(v: Tensor, g: Tensor, lo: float, hi: float) -> Tensor:
    g0, g1 = g[0], g[1]
    if g.dtype == torch.bool:
        return v.copy_(torch.where(g1, hi, torch.where(g0, v, lo)))
    return v.mul_(g0 - g1).add_((1 - g0) * lo + g1 * hi)


@fx_leaf
def gate_maxpool(v: Tensor, g: Tensor, ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool) -> Tensor:
    """Max-pool gate: ``g`` holds per-plane arg-max indices (hard) or window weights (soft)."""
    if not g.is_floating_point():
        if _FORM.get() == "portable":
            return maxpool_gate.select_chain(v, g, PoolGeometry(ndim, kernel_size, stride, padding, dilation,
                                                                ceil_mode))
        return v.flatten(-ndim).gather(-1, g.flatten(-ndim)).view(g.shape)
    geo = PoolGeometry(ndim, kernel_size, stride, padding, dilation, ceil_mode)
    if torch.compiler.is_compiling():  # as in make_gate
        return (pool_windows(v, geo, 0.0) * g).sum(2)
    return soft_maxpool.soft_select(v, g, geo)


# --------------------------------------------------------------------------------------------------
# pooling helpers
# --------------------------------------------------------------------------------------------------

def _max_pool_fn(ndim: int):
    return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[ndim]


def _avg_pool_fn(ndim: int):
    return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[ndim]


def pool_windows(x: Tensor, geo: PoolGeometry, fill: float) -> Tensor:
    """All pooling windows of ``x`` (N, C, *S) as (N, C, K, *O), K = prod(kernel_size), window axis first.

    Positions outside the input (padding, and the overhang that ``ceil_mode`` allows) hold ``fill``. The window
    axis comes before the output positions (``F.unfold``'s layout): a soft-max or sum over it then runs along
    contiguous positions, several times faster than over a short trailing axis.
    """
    nd = geo.ndim
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    out = geo.output_size(spatial)
    spans = [geo.dilation[i] * (geo.kernel_size[i] - 1) + 1 for i in range(nd)]
    x = maxpool_gate.padded(x, geo, fill)
    if nd == 2:
        cols = F.unfold(x, geo.kernel_size, dilation=geo.dilation, stride=geo.stride)
        positions = [(x.shape[2 + i] - spans[i]) // geo.stride[i] + 1 for i in range(2)]
        k = geo.kernel_size[0] * geo.kernel_size[1]  # not -1: a batch of 0 has no elements to infer it from
        return cols.view(n, c, k, *positions)[:, :, :, :out[0], :out[1]]
    for i in range(nd):
        x = x.unfold(2 + i, spans[i], geo.stride[i]).narrow(2 + i, 0, out[i])
        if geo.dilation[i] > 1:
            x = x[..., :: geo.dilation[i]]
    return x.flatten(2 + nd).movedim(-1, 2)


@fx_leaf
def avg_pool_standin(x: Tensor, ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                     padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool) -> Tensor:
    """The linear stand-in for max-pooling: the mean over the valid elements of each window.

    Same geometry (and so the same output shape) as the max-pool it replaces; padding is not counted.
    In training on the CPU (float32, eager, ``x`` requiring a gradient, no ``ceil_mode``) it is computed as a
    depthwise convolution with a kernel of ones divided by each window's count of valid elements: the same means up
    to rounding, and faster than PyTorch's CPU average-pool kernels forward and backward together (3.2 ms against
    9.2 ms for 32x64x32x32, 3x3/2; 102 ms against 153 ms for 32x64x112x112). Without a gradient the average pool
    stays: oneDNN's depthwise convolution alone was slower than it on some large inputs (92 ms against 40 ms
    forward for 32x64x112x112). Traced and compiled graphs keep the average pool (ONNX ``AveragePool``).
    """
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == ndim + 2 and not ceil_mode
            and x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return _avg_pool_by_conv(x, ndim, kernel_size, stride, padding, dilation)
    if all(d == 1 for d in dilation):
        return _avg_pool_fn(ndim)(x, kernel_size, stride, padding, ceil_mode, count_include_pad=False)
    geo = PoolGeometry(ndim, kernel_size, stride, padding, dilation, ceil_mode)
    total = pool_windows(x, geo, 0.0).sum(2)
    count = pool_windows(torch.ones_like(x[:1, :1]), geo, 0.0).sum(2)
    return total / count


def _avg_pool_by_conv(x: Tensor, ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                      padding: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """:func:`avg_pool_standin` as a depthwise convolution of ones (window sums) over the count of valid
    elements per window (the same convolution of an all-ones plane)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
    channels = x.shape[1]
    ones = torch.ones((channels, 1) + tuple(kernel_size), dtype=x.dtype, device=x.device)
    total = conv(x, ones, stride=stride, padding=padding, dilation=dilation, groups=channels)
    count = conv(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), ones[:1],
                 stride=stride, padding=padding, dilation=dilation)
    return total / count

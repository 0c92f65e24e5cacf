"""The neural path kernel (NPK) of a converted model, exactly, for any value graph the converter produces.

    K(x, x') = sum over paths p of  start_p(x) start_p(x') A_p(x) A_p(x')

summed over every output unit (a path ends at one output unit; every floating output tensor of the model
counts). ``start_p(x)`` is the input element the path starts at (1 for a bias unit, and 1 for every input
element when the model was converted with ``value_input="ones"``: then ``K = sum_p A_p(x) A_p(x')``);
``A_p(x)`` is the product of the gates on the path (hard gates of the eval-mode gating network by default).
What an edge, a gate and a bias path are — batch norm, pooling, max-pool selections, hardtanh / leaky / prelu
slopes — is stated in :mod:`relu2dlgn.explain.pathsum`; in short every coefficient of a linear op is a path
*weight* (it is 1 in K), the gate on a path is the slope of the linear piece each unit selects, and biases
are paths from a bias unit (``bias="paths"``, default) or left out (``bias="none"``).

For a fully-connected net ``Linear -> ReLU -> ... -> Linear`` without biases, with ``C`` output units, this is
the closed form of Lakshminarayanan & Singh (NeurIPS 2020) times the number of outputs:
``K(x, x') = C <x, x'> prod_l <g_l(x), g_l(x')>``. With biases (``"paths"``) it is the recursion
``S_0 = <x, x'>``, ``S_l = <g_l, g_l'> (S_{l-1} + 1)``, ``K = C (S_L + 1)``.

Computation: :func:`~relu2dlgn.explain.pathsum.path_sum_graph` (the value graph with unit weights) is run on
``x_i * x_j`` and the gates of both examples for chunks of ``chunk`` pairs at a time, so memory is the gates of
the examples plus one chunk's activations, whatever the number of pairs; ``K(x, x)`` computes only the pairs
``i <= j``. The diagonal pairs run in float64, the others in float32 when that cannot overflow (see ``dtype``
of :func:`npk`). K grows like the number of paths (geometrically with depth): look at it through
:func:`cosine_normalize`.

Example::

    K = explain.npk(dlgn, x)                  # (n, n), float64, symmetric PSD
    K12 = explain.npk(dlgn, x, x2)            # (n, m)
    explain.kernel_alignment(K, y)            # <K, YY^T> / (|K| |YY^T|), Y one-hot
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor
from tqdm import tqdm

from ..errors import ExplainError, InputError
from ..utils.modes import eval_mode
from .common import cat_gates, fitting, require_dlgn, require_single_input, select_gates
from .pathsum import BiasMode, path_sum_graph

log = logging.getLogger(__name__)


_FLOAT32_SAFE = 1e30  # largest path sum run in float32 (float32 overflows at 3.4e38)


def _inputs_and_gates(dlgn: Any, x: Tensor, hard: bool, chunk: int) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Value inputs (float64) and gates (masks and soft gates in float64) of every example, computed in chunks."""
    if not isinstance(x, Tensor):
        raise InputError(f"npk: x must be a tensor batch, got {type(x).__name__}")
    x = x.to(dlgn.device)
    dlgn.check_inputs((x,))
    parts = []
    with eval_mode(dlgn), torch.no_grad(), fitting(dlgn, x, "npk: the inputs"):
        for s in range(0, x.shape[0], chunk):
            parts.append(dlgn.gates(x[s:s + chunk], hard=hard))
    gates = cat_gates(parts, dlgn.gate_specs)
    u = dlgn.value_inputs(x)[0].to(torch.float64)
    return u, _cast(gates, torch.float64)


def _cast(gates: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Soft gates and hard masks (boolean) as numbers in ``dtype``: the pair ops multiply by them. Max-pool
    indices stay integers."""
    return tuple(g.to(dtype) if g.is_floating_point() or g.dtype == torch.bool else g for g in gates)


def _leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _leaves(o)]
    return []


def _per_pair(out: Any, pairs: int) -> Tensor:
    total = None
    for k, t in enumerate(_leaves(out)):
        if t.dim() == 0 or t.shape[0] != pairs:
            raise ExplainError(f"npk: output {k} of the model has shape {tuple(t.shape)}, without a batch "
                               f"dimension of {pairs}; the kernel needs one output per example")
        s = t.reshape(pairs, -1).sum(1, dtype=torch.float64)
        total = s if total is None else total + s
    if total is None:
        raise ExplainError("npk: the model has no floating-point output")
    return total


class _Peak(fx.Interpreter):
    """Runs the path-sum graph and records the largest magnitude of any value it computes."""

    peak = 0.0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for t in _leaves(out):
            if t.numel():
                self.peak = max(self.peak, float(t.abs().max()))
        return out


def _diagonal(graph: fx.GraphModule, u: Tensor, gates: tuple[Tensor, ...], specs: Any,
              chunk: int) -> tuple[Tensor, float]:
    """``K(x_i, x_i)`` in float64 and the largest intermediate path sum of these pairs."""
    probe = _Peak(graph)
    diag = []
    for s in range(0, u.shape[0], chunk):
        i = torch.arange(s, min(s + chunk, u.shape[0]), device=u.device)
        g = select_gates(gates, specs, i)
        ui = u.index_select(0, i)
        diag.append(_per_pair(probe.run(ui * ui, *g, *g), i.numel()))
    return torch.cat(diag), probe.peak


def npk(dlgn: Any, x: Tensor, x2: Tensor | None = None, *, bias: BiasMode = "paths", hard: bool = True,
        chunk: int = 128, dtype: torch.dtype | None = None, progress: bool = False) -> Tensor:
    """The neural path kernel ``K[i, j] = K(x[i], x2[j])`` (``x2`` defaults to ``x``), float64, on the model's
    device.

    ``bias``: ``"paths"`` (bias units start paths) or ``"none"`` (see the module docstring). ``hard``: hard
    gates (default) or the soft gates ``sigmoid(beta q)`` / window soft-max of training. ``chunk``: pairs per
    forward pass (memory bound). Gates and batch norm are evaluated in eval mode; the model is not changed.

    ``dtype``: the precision of the pairs ``i != j``. Every value the path-sum graph computes for a pair is an
    inner product ``<phi_u(x), phi_u(x')>``, so by Cauchy-Schwarz it is bounded by the values of the diagonal
    pairs ``(x, x)``, which are computed first, in float64. ``None`` (default) runs the other pairs in float32
    when that bound is below 1e30 (10x faster on CPU; relative error ~1e-6) and in float64 otherwise;
    ``torch.float64`` forces float64.

    Raises :class:`~relu2dlgn.errors.ExplainError` for a model that is not converted, has several inputs, or
    whose value network has an op whose path weights are unknown (named); :class:`~relu2dlgn.errors.InputError`
    for inputs that do not fit the model.
    """
    dlgn = require_dlgn(dlgn, "npk")
    require_single_input(dlgn, "npk")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"npk: chunk must be a positive integer, got {chunk!r}")
    if dtype not in (None, torch.float32, torch.float64):
        raise InputError(f"npk: dtype must be None, torch.float32 or torch.float64, got {dtype!r}")
    graph = path_sum_graph(dlgn, bias).to(dlgn.device)
    specs = dlgn.gate_specs
    symmetric = x2 is None
    u1, g1 = _inputs_and_gates(dlgn, x, hard, chunk)
    u2, g2 = (u1, g1) if symmetric else _inputs_and_gates(dlgn, x2, hard, chunk)
    with torch.no_grad():
        d1, peak1 = _diagonal(graph, u1, g1, specs, chunk)
        d2, peak2 = (d1, peak1) if symmetric else _diagonal(graph, u2, g2, specs, chunk)
    bound = (peak1 * peak2) ** 0.5
    if dtype is None:
        dtype = torch.float32 if bound < _FLOAT32_SAFE else torch.float64
    if bound == float("inf") or bound != bound:
        raise ExplainError("npk: the path sums overflow float64 (too many paths); use a shallower model")
    n, m = u1.shape[0], u2.shape[0]
    if symmetric:
        rows, cols = torch.triu_indices(n, n, offset=1)
    else:
        rows = torch.arange(n).repeat_interleave(m)
        cols = torch.arange(m).repeat(n)
    if dtype != torch.float64:
        graph = graph.to(dtype)
        u1, u2 = u1.to(dtype), u2.to(dtype)
        g1, g2 = _cast(g1, dtype), (_cast(g2, dtype) if not symmetric else None)
        g2 = g1 if symmetric else g2
    K = torch.zeros(n, m, dtype=torch.float64, device=u1.device)
    log.debug("npk: %d examples x %d, %d off-diagonal pairs in %s, chunks of %d", n, m, rows.numel(), dtype, chunk)
    with torch.no_grad():
        for s in tqdm(range(0, rows.numel(), chunk), desc="npk", disable=not progress, leave=False):
            i, j = rows[s:s + chunk].to(u1.device), cols[s:s + chunk].to(u1.device)
            u = u1.index_select(0, i) * u2.index_select(0, j)
            out = graph(u, *select_gates(g1, specs, i), *select_gates(g2, specs, j))
            K[i, j] = _per_pair(out, i.numel())
    if symmetric:
        K = K + K.T
        K.diagonal().copy_(d1)
    if not torch.isfinite(K).all():
        raise ExplainError("npk: the kernel overflowed (too many paths); use a shallower model")
    return K


def cosine_normalize(K: Tensor) -> Tensor:
    """``K[i, j] / sqrt(K[i, i] K[j, j])`` for a square kernel (entries with a zero diagonal stay 0)."""
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise InputError(f"cosine_normalize needs a square kernel, got shape {tuple(K.shape)}")
    d = K.diagonal().clamp_min(0).sqrt()
    scale = torch.outer(d, d)
    return torch.where(scale > 0, K / scale.clamp_min(torch.finfo(K.dtype).tiny), torch.zeros_like(K))


def kernel_alignment(K: Tensor, y: Tensor, num_classes: int | None = None) -> float:
    """Kernel-target alignment ``<K, Y Y^T>_F / (||K||_F ||Y Y^T||_F)`` with ``Y`` the one-hot labels ``y``."""
    y = torch.as_tensor(y).long().to(K.device)
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] != y.numel():
        raise InputError(f"kernel_alignment: K of shape {tuple(K.shape)} does not match {y.numel()} labels")
    Y = torch.nn.functional.one_hot(y, num_classes or int(y.max()) + 1).to(K.dtype)
    T = Y @ Y.T
    return float((K * T).sum() / (K.norm() * T.norm()).clamp_min(torch.finfo(K.dtype).tiny))

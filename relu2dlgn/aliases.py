"""Storage aliasing in a traced graph: which nodes may share storage, and which nodes write into storage.

A node *mutates* a tensor when it works in place (``x.add_(1)``, ``x += y``, ``F.relu(x, inplace=True)``, an
``inplace=True`` module), writes through ``out=`` (``torch.add(a, b, out=y)``) or assigns into it
(``y[idx] = v``, i.e. ``operator.setitem``). The rewrite must never drop such a node while the tensor it writes
is read, and must not let a removed gate site turn two separate tensors into one (see :mod:`relu2dlgn.rewrite`).

The analysis is conservative: a node shares its first input's storage group unless it is known to return a
fresh tensor (a convolution, an addition, ...); a mutation joins the group of the tensor it writes.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import gates as G

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}

SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "stride", "element_size", "get_device",
                 "is_contiguous", "is_floating_point", "is_complex", "data_ptr"}
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_leaf"}


def is_shape_query(node: fx.Node) -> bool:
    """``x.size()``, ``x.shape``, ``x.dtype``, ...: a node that reads a tensor's metadata, not its data."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in SHAPE_ATTRS
    return False


_FRESH_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
    nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample, nn.Embedding, nn.Softmax, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU,
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Hardtanh,  # in place they write (see written_input), else fresh
)
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.matmul, torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.stack, torch.matmul,
    torch.mean, torch.sum, torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d, F.linear,
    F.batch_norm, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.interpolate, F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.sigmoid,
    torch.tanh, F.softmax, F.gelu, G.gate_relu, G.gate_leaky_relu, G.gate_prelu, G.gate_hardtanh,
    G.gate_maxpool, G.avg_pool_standin,
    F.relu, torch.relu, F.leaky_relu, F.hardtanh, F.relu6, F.prelu, torch.prelu,  # unless in place: a write
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.where, torch.masked_fill, torch.lerp, torch.addcmul, torch.addcdiv, torch.subtract, torch.multiply,
    torch.divide, torch.true_divide, torch.neg, torch.negative, torch.flip, torch.roll, torch.cumsum, torch.einsum,
    torch.bmm, torch.mm, torch.mv, torch.addmm, torch.baddbmm, torch.tensordot, torch.concat, torch.concatenate,
    torch.hstack, torch.vstack, torch.clone, torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    F.pad, F.bilinear, F.pixel_shuffle, F.pixel_unshuffle, F.unfold, F.fold, F.grid_sample, torch.exp, torch.square,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "mean", "sum", "clone", "matmul", "sigmoid", "tanh", "softmax",
                  "exp", "neg", "abs", "pow", "relu", "new_zeros", "new_ones", "new_empty", "new_full", "masked_fill",
                  "where", "lerp", "addcmul", "addcdiv", "flip", "roll", "cumsum", "repeat", "repeat_interleave",
                  "tile", "bmm", "mm", "subtract", "multiply", "divide", "true_divide", "square", "sin", "cos"}


def _bind(fn: Callable, node: fx.Node) -> dict[str, Any]:
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


def is_inplace(node: fx.Node, modules: dict[str, Any]) -> bool:
    """True if the node mutates its first argument (and returns it)."""
    if node.op == "call_method":
        t = node.target
        return t.endswith("_") and not t.startswith("_") and t not in ("requires_grad_", "share_memory_")
    if node.op == "call_function":
        fn = node.target
        if fn in _INPLACE_OPERATORS:
            return True
        name = getattr(fn, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        if callable(fn) and getattr(fn, "__module__", "") == "torch.nn.functional":
            return bool(_bind(fn, node).get("inplace", False))
        return False
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    return False


def first_node(node: fx.Node) -> fx.Node | None:
    """The first node among ``node``'s positional, then keyword arguments (``None`` if there is none)."""
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
    for a in node.kwargs.values():
        if isinstance(a, fx.Node):
            return a
    return None


def written_input(node: fx.Node, modules: dict[str, Any]) -> fx.Node | None:
    """The input tensor that ``node`` writes into: its ``out=`` tensor, the target of ``operator.setitem``, or
    the first argument of an in-place op; ``None`` if it writes nothing."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    if node.op == "call_function" and node.target is operator.setitem and isinstance(node.args[0], fx.Node):
        return node.args[0]
    if is_inplace(node, modules):
        return first_node(node)
    return None


def is_fresh(node: fx.Node, modules: dict[str, Any]) -> bool:
    """True if ``node`` is known to return newly allocated storage (never an alias of an input); a shape query
    returns no storage at all."""
    if is_shape_query(node):
        return True
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _FRESH_MODULES)
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return node.op != "output"  # placeholders and attributes are storage of their own; the output is its value


def alias_analysis(graph: fx.Graph, modules: dict[str, Any]) -> tuple[dict[fx.Node, int], list[tuple[fx.Node, int]]]:
    """Conservative storage groups: a node shares its first input's group unless it is known to return a
    fresh tensor; a node that writes into a tensor (in place, ``out=``, ``setitem``) joins that tensor's group.
    Returns the groups and the mutations ``(node, group written)`` in graph order."""
    group: dict[fx.Node, int] = {}
    mutations: list[tuple[fx.Node, int]] = []
    fresh = 0
    for node in graph.nodes:
        written = written_input(node, modules)
        if written is not None:
            group[node] = group[written]
            mutations.append((node, group[written]))
            continue
        first = first_node(node)
        if first is None or is_fresh(node, modules):
            fresh += 1
            group[node] = -fresh
        else:
            group[node] = group[first]
    return group, mutations

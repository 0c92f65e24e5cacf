"""The path-sum graph: a DLGN's value graph with every edge weight set to 1, which computes the neural path
kernel when fed the product of two examples' inputs and both examples' gates.

A *path* runs from one input element (or a bias unit) to one output unit through individual edges — each
kernel tap of a convolution, each entry of a linear layer, each element of a pooling window, each operand of
an addition is its own edge. The value network computes ``sum_p start_p(x) A_p(x) w_p``, where ``A_p`` is the
product of the gates on ``p`` and ``w_p`` the product of its edge weights. The neural path kernel is

    K(x, x') = sum_p start_p(x) start_p(x') A_p(x) A_p(x')

and the graph built here computes exactly this sum at each output unit when every edge weight is 1, its input
is ``x * x'`` and every gate application multiplies by the product of both examples' gates.

Conventions (what is an edge weight, what is a gate, what starts a path):

* **Edge weights → 1.** Every coefficient of a linear op belongs to the path *value*, learnt or not:
  convolution and linear weights, the batch-norm scale ``gamma / sqrt(var + eps)`` (eval mode), the ``1/k`` of
  average pooling (``AvgPool``, ``adaptive_avg_pool``, the max-pool stand-in of ``pool="avg"``) and of
  ``mean``, scalar multiplications and divisions in the model's code, the ``-1`` of a subtraction, the
  ``alpha`` of ``torch.add``, the entries of a constant matrix in ``x @ W``. So averaging becomes summing over
  the same (valid) elements, subtraction becomes addition, ``x * c`` becomes ``x``, ``x @ W`` becomes
  ``x @ ones_like(W)``.
* **Biases** (``bias``). Every additive constant — a convolution or linear bias, the batch-norm shift
  ``beta - mean * scale`` (always present in eval mode), a constant added in the model's code, the constants
  ``lo`` / ``hi`` of a hardtanh piece — is an edge from a bias unit whose input is 1. ``"paths"``: these paths
  count, each with start value ``1 * 1``, so the graph adds 1 wherever the value network adds a constant;
  ``"none"``: they do not (the graph adds 0), and K is the kernel of the value network's linear part.
* **Gates.** The gate on a path through a piecewise-linear unit is the slope of the piece its pre-activation
  selects: relu ``{0, 1}``, leaky_relu ``{a, 1}``, prelu ``{w_c, 1}`` (its learnt slope is part of the gate),
  hardtanh ``g0 - g1 in {0, 1}``. A hardtanh's constant is a bias edge gated by ``1 - g0`` (weight ``lo``) or
  ``g1`` (weight ``hi``), so with ``bias="paths"`` it adds ``(1-g0)(1-g0') + g1 g1'``.
  Max-pool: the edge from window position k to the output passes when the arg max is k; the product of two
  selections passes only where *both* examples select the same position: ``v[idx] * 1(idx == idx')``. Soft
  gates (sigmoid / window soft-max weights) enter the same formulas as numbers in [0, 1].
* **Not linear → refused.** A value graph with an op whose edge weights are not known here (a product of two
  input-dependent tensors, a normalisation by input statistics, an unknown module) raises
  :class:`~relu2dlgn.errors.ExplainError` naming the node and module path.

The graph runs in float64 (the number of paths grows geometrically with depth) and in eval mode (dropout is
the identity).
"""
from __future__ import annotations

import copy
import functools
import operator
from typing import Any, Callable, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import gates as G
from ..dlgn import DLGN
from ..errors import ExplainError
from ..gates import PoolGeometry
from .pathops import (adaptive_sum_pool, bias_like, pair_hardtanh, pair_hardtanh_, pair_leaky_relu, pair_leaky_relu_,
                      pair_maxpool, pair_prelu, pair_relu, pair_relu_, sum_pool, unit_like)

BiasMode = Literal["paths", "none"]


# --------------------------------------------------------------------------------------------------
# the rewrite
# --------------------------------------------------------------------------------------------------

_PAIR_OPS: dict[Callable, Callable] = {
    G.gate_relu: pair_relu, G.gate_relu_: pair_relu_, G.gate_leaky_relu: pair_leaky_relu,
    G.gate_leaky_relu_: pair_leaky_relu_, G.gate_prelu: pair_prelu, G.gate_hardtanh: pair_hardtanh,
    G.gate_hardtanh_: pair_hardtanh_, G.gate_maxpool: pair_maxpool,
}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub: operator.add, operator.isub: operator.iadd, torch.sub: torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_MATMUL = {operator.matmul, torch.matmul, torch.mm, torch.bmm}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_AVG_POOL = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_WEIGHTED = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_STRUCTURAL = {operator.getitem, getattr, torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape,
               torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
               torch.narrow, torch.select, torch.movedim, torch.sum, torch.unflatten}
_STRUCTURAL_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                       "size", "dim", "chunk", "split", "expand", "narrow", "select", "clone", "unflatten",
                       "movedim", "view_as", "reshape_as", "expand_as", "t", "numel", "sum", "__getitem__"}
_CASTS = {"float", "double", "half", "bfloat16", "to", "type_as", "type"}
_KEEP_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout)
_AVG_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_MODULES = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


class _Rewriter:
    def __init__(self, dlgn: DLGN, bias: BiasMode):
        self.value = dlgn.value
        self.bias = 1.0 if bias == "paths" else 0.0
        self.modules = dict(self.value.named_modules())
        self.graph = fx.Graph()
        out = self.graph.graph_copy(self.value.graph, {})
        self.graph.output(out)
        self.root: dict[str, Any] = {}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        n_in, n_sites = len(dlgn.input_specs), len(dlgn.sites)
        if len(placeholders) != n_in + n_sites:  # pragma: no cover - convert() builds it so
            raise ExplainError(f"npk: the value graph has {len(placeholders)} inputs, expected {n_in} + {n_sites}")
        last = placeholders[-1]
        self.partner: dict[fx.Node, fx.Node] = {}
        for i, gate in enumerate(placeholders[n_in:]):
            with self.graph.inserting_after(last):
                last = self.graph.placeholder(f"gate_{i}_other")
            self.partner[gate] = last
        self.dep: set[fx.Node] = set(placeholders) | set(self.partner.values())

    # -- helpers -------------------------------------------------------------------------------------------
    def fail(self, node: fx.Node, what: str, why: str) -> ExplainError:
        where = node.meta.get("module_path", "") or "<root>"
        return ExplainError(
            f"npk: cannot set the path weights of node '{node.name}' ({what}, module '{where}') to 1: {why}. The "
            f"neural path kernel is read from value networks made of convolutions, linear layers, batch norm "
            f"(eval), average pooling, additions, scalings, concatenation and reshaping")

    def is_dep(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a in self.dep

    def call(self, node: fx.Node, fn: Callable, args: tuple, kwargs: dict | None = None) -> fx.Node:
        with self.graph.inserting_before(node):
            new = self.graph.call_function(fn, args, kwargs or {})
        new.meta = dict(node.meta)
        return new

    def replace(self, node: fx.Node, new: fx.Node) -> None:
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.dep.add(new)

    def module_copy(self, target: str) -> nn.Module:
        m = copy.deepcopy(self.modules[target])
        self.root[target] = m
        return m

    # -- the pass ---------------------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in list(self.graph.nodes):
            if node.op == "get_attr":
                self.root[node.target] = copy.deepcopy(_fetch(self.value, node.target))
                continue
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            if not any(self.is_dep(a) for a in node.all_input_nodes) or _shape_query(node):
                if node.op == "call_module":
                    self.module_copy(node.target)
                continue
            self.dep.add(node)
            if node.op == "call_module":
                self.module(node)
            elif node.op == "call_function":
                self.function(node)
            else:
                self.method(node)
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name="PathSum")
        return gm.to(torch.float64).eval().requires_grad_(False)

    def module(self, node: fx.Node) -> None:
        m = self.modules[node.target]
        name = type(m).__name__
        x = node.args[0] if node.args else None
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            m = self.module_copy(node.target)
            with torch.no_grad():
                m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.fill_(self.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not m.track_running_stats or m.running_mean is None:
                raise self.fail(node, name, "it normalises by the batch's own statistics (no running statistics)")
            self.replace(node, self.call(node, operator.add, (x, self.bias)))
        elif type(m) in _AVG_MODULES:
            nd = _AVG_MODULES[type(m)]
            geo = PoolGeometry.make(nd, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)
            self.replace(node, self.call(node, sum_pool, (x, *_geometry(geo))))
        elif type(m) in _ADAPTIVE_MODULES:
            self.replace(node, self.call(node, adaptive_sum_pool, (x, m.output_size, _ADAPTIVE_MODULES[type(m)])))
        elif isinstance(m, _KEEP_MODULES) or (isinstance(m, nn.Upsample) and m.mode == "nearest"):
            self.module_copy(node.target)
        else:
            raise self.fail(node, f"module {name}", "its edge weights are unknown")

    def function(self, node: fx.Node) -> None:
        fn = node.target
        args, kwargs = node.args, dict(node.kwargs)
        name = getattr(fn, "__name__", str(fn))
        if fn in _PAIR_OPS:
            v, g, *rest = args
            if fn in (G.gate_hardtanh, G.gate_hardtanh_):
                rest = [self.bias]
            self.replace(node, self.call(node, _PAIR_OPS[fn], (v, g, self.partner[g], *rest)))
        elif fn is G.avg_pool_standin:
            self.replace(node, self.call(node, sum_pool, args))
        elif fn in _AVG_POOL:
            nd = _AVG_POOL[fn]
            a = _bind(("input", "kernel_size", "stride", "padding", "ceil_mode"), args, kwargs,
                      {"stride": None, "padding": 0, "ceil_mode": False})
            geo = PoolGeometry.make(nd, a["kernel_size"], a["stride"], a["padding"], 1, a["ceil_mode"])
            self.replace(node, self.call(node, sum_pool, (a["input"], *_geometry(geo))))
        elif fn in _ADAPTIVE:
            a = _bind(("input", "output_size"), args, kwargs, {})
            self.replace(node, self.call(node, adaptive_sum_pool, (a["input"], a["output_size"], _ADAPTIVE[fn])))
        elif fn is torch.mean:
            self.replace(node, self.call(node, torch.sum, args, kwargs))
        elif fn in _ADD or fn in _SUB:
            self.additive(node, _SUB.get(fn, fn), args, name)
        elif fn in _MUL or fn in _DIV:
            self.scaling(node, fn, args, name, divides=fn in _DIV)
        elif fn in _MATMUL:
            self.scaling(node, fn, args, name, divides=False)
        elif fn in (operator.neg, torch.neg):
            self.replace(node, self.call(node, operator.mul, (args[0], 1.0)))
        elif fn in _WEIGHTED:
            a = list(args)
            w = a[1] if len(a) > 1 else kwargs.get("weight")
            b = a[2] if len(a) > 2 else kwargs.get("bias")
            if self.is_dep(w) or self.is_dep(b):
                raise self.fail(node, name, "its weight depends on the input")
            ones = self.call(node, unit_like, (w,))
            bias = self.call(node, bias_like, (b, self.bias)) if isinstance(b, fx.Node) else None
            rest = a[3:]
            kwargs.pop("weight", None)
            kwargs.pop("bias", None)
            self.replace(node, self.call(node, fn, (a[0], ones, bias, *rest), kwargs))
        elif fn in _DROPOUT:
            self.replace(node, self.call(node, operator.mul, (args[0], 1.0)))
        elif fn is F.pad:
            value = args[3] if len(args) > 3 else kwargs.get("value", None)
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            if mode != "constant" or value not in (None, 0, 0.0):
                raise self.fail(node, name, f"padding mode {mode!r} with value {value!r} is not a zero pad")
        elif fn is F.interpolate:
            mode = args[3] if len(args) > 3 else kwargs.get("mode", "nearest")
            if mode != "nearest":
                raise self.fail(node, name, f"{mode!r} interpolation mixes elements with input-size weights")
        elif fn in _STRUCTURAL or getattr(fn, "__name__", "") == "_check_specialisation":
            pass
        else:
            raise self.fail(node, name, "it is not a known linear op")

    def method(self, node: fx.Node) -> None:
        t = node.target
        args = node.args
        if t in ("add", "add_", "sub", "sub_"):
            fn = {"add": operator.add, "sub": operator.add, "add_": operator.iadd, "sub_": operator.iadd}[t]
            self.additive(node, fn, args, f"Tensor.{t}")
        elif t in ("mul", "mul_", "div", "div_", "true_divide", "true_divide_"):
            fn = operator.imul if t.endswith("_") else operator.mul
            if t.startswith(("div", "true")):
                fn = operator.itruediv if t.endswith("_") else operator.truediv
            self.scaling(node, fn, args, f"Tensor.{t}", divides=fn in _DIV)
        elif t in ("matmul", "mm", "bmm"):
            self.scaling(node, operator.matmul, args, f"Tensor.{t}", divides=False)
        elif t == "neg":
            self.replace(node, self.call(node, operator.mul, (args[0], 1.0)))
        elif t == "neg_" or t in _CASTS:
            node.replace_all_uses_with(args[0])
            self.graph.erase_node(node)
        elif t == "mean":
            with self.graph.inserting_before(node):
                new = self.graph.call_method("sum", args, dict(node.kwargs))
            new.meta = dict(node.meta)
            self.replace(node, new)
        elif t not in _STRUCTURAL_METHODS:
            raise self.fail(node, f"Tensor.{t}", "it is not a known linear op")

    def additive(self, node: fx.Node, fn: Callable, args: tuple, name: str) -> None:
        a, b = args[0], args[1]
        if not self.is_dep(a):
            a = self.call(node, bias_like, (a, self.bias))
        elif not self.is_dep(b):
            b = self.call(node, bias_like, (b, self.bias))
        self.replace(node, self.call(node, fn, (a, b)))

    def scaling(self, node: fx.Node, fn: Callable, args: tuple, name: str, *, divides: bool) -> None:
        a, b = args[0], args[1]
        if divides and self.is_dep(b):
            raise self.fail(node, name, "it divides by an input-dependent tensor (not linear)")
        if self.is_dep(a) and self.is_dep(b):
            raise self.fail(node, name, "it multiplies two input-dependent tensors (not linear)")
        if self.is_dep(a):
            b = self.call(node, unit_like, (b,))
        else:
            a = self.call(node, unit_like, (a,))
        self.replace(node, self.call(node, fn, (a, b)))


def _shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim", "dtype",
                                                                                       "device")


def _fetch(root: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), root)


def _geometry(geo: PoolGeometry) -> tuple:
    return (geo.ndim, geo.kernel_size, geo.stride, geo.padding, geo.dilation, geo.ceil_mode)


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict, defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def path_sum_graph(dlgn: DLGN, bias: BiasMode = "paths") -> fx.GraphModule:
    """The path-sum graph of ``dlgn``'s value network (see the module docstring), in float64 and eval mode.

    Called as ``graph(*value_inputs, *gates_x, *gates_x2)`` with value inputs ``x * x'`` it returns, at each
    output unit, the sum over the paths ending there of ``start(x) start(x') A_p(x) A_p(x')``.
    Raises :class:`~relu2dlgn.errors.ExplainError` naming the first node whose edge weights are unknown.
    """
    if bias not in ("paths", "none"):
        raise ExplainError(f"npk: bias must be 'paths' or 'none', got {bias!r}")
    if dlgn.report.nonlinear_kept:
        kept = ", ".join(str(n) for n in dlgn.report.nonlinear_kept[:4])
        raise ExplainError(f"npk: the value network keeps nonlinearities that are not gates ({kept}); its output is "
                           f"not a sum over paths, so it has no neural path kernel")
    return _Rewriter(dlgn, bias).run()

"""Gate sites: which nodes of a traced graph are gates, which are other nonlinearities, which mutate in place.

A *gate site* is one call of a piecewise-linear activation or of max-pooling in the traced graph: a module
called twice is two sites. Sites are numbered in graph (execution) order.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import ConversionError
from .gates import GateSpec, PoolGeometry

# --------------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------------

_GATE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Hardtanh)  # ReLU6 subclasses Hardtanh
_MAXPOOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}

_NONLINEAR_MODULES: tuple[type, ...] = (
    nn.Sigmoid, nn.Tanh, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.GLU, nn.RReLU,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.LocalResponseNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.MultiheadAttention,
)

_NONLINEAR_FUNCTIONS: set[Callable] = {
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.softmax, F.softmax, F.log_softmax, torch.log_softmax,
    F.softmin, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.elu, F.selu, F.celu, F.softplus,
    F.softsign, F.logsigmoid, F.glu, F.rrelu, F.threshold, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.clamp, torch.clip, torch.where, torch.erf, torch.sign, torch.max, torch.min, torch.amax,
    torch.amin, torch.pow, torch.norm, F.normalize, F.layer_norm, F.group_norm, F.instance_norm,
    F.local_response_norm, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.scaled_dot_product_attention, operator.abs, operator.pow,
}

_NONLINEAR_METHODS = {
    "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "exp", "exp_", "log", "log_", "sqrt",
    "sqrt_", "rsqrt", "rsqrt_", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "clamp_max",
    "clamp_max_", "abs", "abs_", "max", "min", "amax", "amin", "pow", "pow_", "norm", "erf", "erf_",
    "sign", "sign_", "reciprocal", "reciprocal_", "square", "square_", "sort", "topk", "argmax", "argmin",
}

# product-like ops: nonlinear when two of their operands depend on the input
_BILINEAR_FUNCTIONS: set[Callable] = {operator.mul, operator.imul, operator.matmul, operator.imatmul,
                                      torch.mul, torch.matmul, torch.bmm, torch.mm, torch.einsum}
_BILINEAR_METHODS = {"mul", "mul_", "matmul", "bmm", "mm"}
_DIVISION = {operator.truediv, operator.itruediv, operator.floordiv, torch.div, torch.true_divide}
_DIVISION_METHODS = {"div", "div_", "true_divide", "true_divide_"}

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}

_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}


def is_activation_module(m: nn.Module) -> bool:
    """True for the piecewise-linear activation modules that become gates."""
    return isinstance(m, _GATE_MODULES)


def nonlinear_module_name(m: nn.Module) -> str | None:
    return type(m).__name__ if isinstance(m, _NONLINEAR_MODULES) else None


# --------------------------------------------------------------------------------------------------
# sites
# --------------------------------------------------------------------------------------------------

@dataclass
class GateSite:
    """One gate call site of the traced source model."""

    index: int
    kind: str
    node: str
    module_path: str
    op: str
    inplace: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None

    @property
    def spec(self) -> GateSpec:
        pool = None
        if self.kind == "maxpool":
            p = self.params
            pool = PoolGeometry(p["ndim"], tuple(p["kernel_size"]), tuple(p["stride"]), tuple(p["padding"]),
                                tuple(p["dilation"]), bool(p["ceil_mode"]))
        return GateSpec(self.kind, float(self.params.get("lo", 0.0)), float(self.params.get("hi", 0.0)), pool)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "node": self.node, "module_path": self.module_path,
                "op": self.op, "inplace": self.inplace, "params": self.params,
                "shape": list(self.shape) if self.shape is not None else None}


@dataclass
class Classified:
    """How a gate node is to be rewritten: its kind, its pre-activation input and its parameters."""

    kind: str
    op: str
    inplace: bool
    input: fx.Node
    params: dict[str, Any]
    weight: Any = None  # prelu: fx.Node (get_attr or computed) or a module-path string for call_module


def _bind(fn: Callable, node: fx.Node) -> dict[str, Any]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


def _pool_params(ndim: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any,
                 where: str) -> dict[str, Any]:
    values = (kernel_size, stride, padding, dilation, ceil_mode)
    if any(isinstance(v, fx.Node) for v in values) or any(
            isinstance(x, fx.Node) for v in values if isinstance(v, (tuple, list)) for x in v):
        raise ConversionError(f"max-pool at {where} has a geometry computed at run time; only constant "
                              f"kernel_size/stride/padding/dilation/ceil_mode are supported")
    return PoolGeometry.make(ndim, kernel_size, stride, padding, dilation, ceil_mode).as_dict()


# F.relu_ is torch.relu_ itself
_FUNCTIONAL_RELU = {F.relu: ("F.relu", None), torch.relu: ("torch.relu", False), torch.relu_: ("torch.relu_", True)}
_FUNCTIONAL_MAXPOOL = {F.max_pool1d: ("F.max_pool1d", 1), F.max_pool2d: ("F.max_pool2d", 2),
                       F.max_pool3d: ("F.max_pool3d", 3), torch.max_pool1d: ("torch.max_pool1d", 1),
                       torch.max_pool2d: ("torch.max_pool2d", 2), torch.max_pool3d: ("torch.max_pool3d", 3)}
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _positional(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for name, value in zip(names, node.args):
        out[name] = value
    out.update(node.kwargs)
    return out


def classify_gate(node: fx.Node, modules: dict[str, Any]) -> Classified | None:
    """The gate this node is, or ``None``. Raises for gate ops used in an unsupported way."""
    where = f"node '{node.name}' (module '{node.meta.get('module_path', '') or '<root>'}')"
    if node.op == "call_module":
        m = modules[node.target]
        if not node.args:
            return None
        x = node.args[0]
        if isinstance(m, nn.PReLU):
            return Classified("prelu", "nn.PReLU", False, x, {"num_parameters": m.num_parameters},
                              weight=f"{node.target}.weight")
        if isinstance(m, nn.LeakyReLU):
            return Classified("leaky_relu", f"nn.LeakyReLU({m.negative_slope})", m.inplace, x,
                              {"negative_slope": float(m.negative_slope)})
        if isinstance(m, nn.ReLU):
            return Classified("relu", "nn.ReLU" + ("(inplace=True)" if m.inplace else ""), m.inplace, x, {})
        if isinstance(m, nn.Hardtanh):
            name = "nn.ReLU6" if isinstance(m, nn.ReLU6) else f"nn.Hardtanh({m.min_val}, {m.max_val})"
            return Classified("hardtanh", name, m.inplace, x, {"lo": float(m.min_val), "hi": float(m.max_val)})
        for cls, nd in _MAXPOOL_MODULES.items():
            if isinstance(m, cls):
                if m.return_indices:
                    raise ConversionError(f"max-pool with return_indices=True at {where} is not supported")
                return Classified("maxpool", type(m).__name__, False, x,
                                  _pool_params(nd, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                               where))
        return None
    if node.op == "call_function":
        fn = node.target
        if fn in _FUNCTIONAL_RELU:
            name, inplace = _FUNCTIONAL_RELU[fn]
            a = _positional(node, ("input", "inplace"), {"inplace": False})
            inplace = bool(a["inplace"]) if inplace is None else inplace
            return Classified("relu", name, inplace, a["input"], {})
        if fn in (F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu, torch._C._nn.leaky_relu_):
            a = _positional(node, ("input", "negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False})
            inplace = fn in (F.leaky_relu_, torch._C._nn.leaky_relu_) or bool(a["inplace"])
            return Classified("leaky_relu", f"F.leaky_relu({a['negative_slope']})", inplace, a["input"],
                              {"negative_slope": float(a["negative_slope"])})
        if fn in (F.relu6,):
            a = _positional(node, ("input", "inplace"), {"inplace": False})
            return Classified("hardtanh", "F.relu6", bool(a["inplace"]), a["input"], {"lo": 0.0, "hi": 6.0})
        if fn in (F.hardtanh, F.hardtanh_, torch._C._nn.hardtanh, torch._C._nn.hardtanh_):
            a = _positional(node, ("input", "min_val", "max_val", "inplace"),
                            {"min_val": -1.0, "max_val": 1.0, "inplace": False})
            inplace = fn in (F.hardtanh_, torch._C._nn.hardtanh_) or bool(a["inplace"])
            return Classified("hardtanh", f"F.hardtanh({a['min_val']}, {a['max_val']})", inplace, a["input"],
                              {"lo": float(a["min_val"]), "hi": float(a["max_val"])})
        if fn in (F.prelu, torch.prelu):
            a = _positional(node, ("input", "weight"), {})
            return Classified("prelu", "F.prelu", False, a["input"], {}, weight=a["weight"])
        if fn in _FUNCTIONAL_MAXPOOL:
            name, nd = _FUNCTIONAL_MAXPOOL[fn]
            a = _positional(node, _MAXPOOL_ARGS, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                                                  "return_indices": False})
            if a["return_indices"]:
                raise ConversionError(f"max-pool with return_indices=True at {where} is not supported")
            return Classified("maxpool", name, False, a["input"],
                              _pool_params(nd, a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                           a["ceil_mode"], where))
        if fn in (F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices):
            raise ConversionError(f"max-pool with indices at {where} is not supported")
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return Classified("relu", f"Tensor.{node.target}", node.target == "relu_", node.args[0], {})
    return None


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


def _depends_on_input(graph: fx.Graph) -> dict[fx.Node, bool]:
    """Which nodes carry tensor data derived from the graph's inputs (shape queries do not)."""
    dep: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            dep[node] = True
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            dep[node] = False
        elif node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS:
            dep[node] = False
        else:
            dep[node] = any(dep.get(n, False) for n in node.all_input_nodes)
    return dep


def nonlinear_reason(node: fx.Node, modules: dict[str, Any], dep: dict[fx.Node, bool]) -> str | None:
    """Why this node is a nonlinearity that is not a gate, or ``None`` if it is linear (or not input-dependent)."""
    if not dep.get(node, False):
        return None
    inputs = [n for n in node.all_input_nodes if dep.get(n, False)]
    if node.op == "call_module":
        m = modules[node.target]
        name = nonlinear_module_name(m)
        if name is not None:
            return f"nn.{name}"
        return None
    if node.op == "call_function":
        fn = node.target
        if fn in _NONLINEAR_FUNCTIONS:
            return _fn_name(fn)
        if fn in _BILINEAR_FUNCTIONS and len(inputs) >= 2:
            return f"{_fn_name(fn)} of two input-dependent tensors"
        if fn in _DIVISION and len(node.args) > 1 and isinstance(node.args[1], fx.Node) and dep.get(node.args[1]):
            return f"{_fn_name(fn)} by an input-dependent tensor"
        return None
    if node.op == "call_method":
        t = node.target
        if t in _NONLINEAR_METHODS:
            return f"Tensor.{t}"
        if t in _BILINEAR_METHODS and len(inputs) >= 2:
            return f"Tensor.{t} of two input-dependent tensors"
        if t in _DIVISION_METHODS and len(node.args) > 1 and isinstance(node.args[1], fx.Node) and dep.get(node.args[1]):
            return f"Tensor.{t} by an input-dependent tensor"
    return None


def _fn_name(fn: Callable) -> str:
    mod = getattr(fn, "__module__", None) or ""
    prefix = {"torch.nn.functional": "F.", "torch": "torch.", "_operator": "operator.",
              "operator": "operator."}.get(mod, "")
    return prefix + getattr(fn, "__name__", repr(fn))


@dataclass
class Nonlinearity:
    """A nonlinear op that is not a gate, with where it is."""

    node: str
    module_path: str
    op: str

    def __str__(self) -> str:
        return f"{self.op} at node '{self.node}' (module '{self.module_path or '<root>'}')"


def find_sites(graph: fx.Graph, modules: dict[str, Any]) -> tuple[list[tuple[fx.Node, Classified]], list[Nonlinearity]]:
    """All gate sites (in graph order) and all non-gate nonlinearities of a traced graph."""
    dep = _depends_on_input(graph)
    sites: list[tuple[fx.Node, Classified]] = []
    nonlinear: list[Nonlinearity] = []
    for node in graph.nodes:
        c = classify_gate(node, modules)
        if c is not None:
            sites.append((node, c))
            continue
        reason = nonlinear_reason(node, modules, dep)
        if reason is not None:
            nonlinear.append(Nonlinearity(node.name, node.meta.get("module_path", ""), reason))
    return sites, nonlinear

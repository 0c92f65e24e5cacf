"""Gate sites: which nodes of a traced graph are gates, and which are other nonlinearities.

A *gate site* is one call of a piecewise-linear activation or of max-pooling in the traced graph: a module
called twice is two sites. Sites are numbered in graph (execution) order. Every other input-dependent node must
be on the allow-list of :mod:`relu2dlgn.affine`; those that are not are the non-gate nonlinearities.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .affine import non_affine
from .dependence import input_dependence
from .aliases import is_inplace  # noqa: F401  (re-exported: in-place detection lives with the alias analysis)
from .errors import ConversionError
from .gates import GateSpec, PoolGeometry

# --------------------------------------------------------------------------------------------------
# gate catalogue (everything else is asked of the allow-list, relu2dlgn.affine)
# --------------------------------------------------------------------------------------------------

_GATE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Hardtanh)  # ReLU6 subclasses Hardtanh
_MAXPOOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


def is_activation_module(m: nn.Module) -> bool:
    """True for the piecewise-linear activation modules that become gates."""
    return isinstance(m, _GATE_MODULES)


def _own_forward(m: nn.Module, cls: type) -> bool:
    """``m`` is a ``cls`` that computes what ``cls`` computes (a subclass overriding ``forward`` -- timm's
    ``MaxPool2dSame`` pads first -- is not the gate its base class is)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def overrides_gate(m: nn.Module) -> bool:
    """``m`` subclasses a gate module but overrides its ``forward``: not a gate itself, but worth tracing into
    (the gate call is likely inside)."""
    gates = (*_GATE_MODULES, *_MAXPOOL_MODULES)
    return isinstance(m, gates) and not any(_own_forward(m, cls) for cls in gates)


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
        if not any(_own_forward(m, cls) for cls in (*_GATE_MODULES, *_MAXPOOL_MODULES)):
            return None
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


@dataclass
class Nonlinearity:
    """A nonlinear op that is not a gate, with where it is."""

    node: str
    module_path: str
    op: str

    def __str__(self) -> str:
        return f"{self.op} at node '{self.node}' (module '{self.module_path or '<root>'}')"


def find_sites(graph: fx.Graph, modules: dict[str, Any]) -> tuple[list[tuple[fx.Node, Classified]], list[Nonlinearity]]:
    """All gate sites (in graph order) and all non-gate nonlinearities of a traced graph: every input-dependent
    node that is neither a gate site nor on the allow-list of :mod:`relu2dlgn.affine`."""
    dep = input_dependence(graph, modules)
    sites: list[tuple[fx.Node, Classified]] = []
    nonlinear: list[Nonlinearity] = []
    for node in graph.nodes:
        c = classify_gate(node, modules)
        if c is not None:
            sites.append((node, c))
            continue
        reason = non_affine(node, modules, dep)
        if reason is not None:
            nonlinear.append(Nonlinearity(node.name, node.meta.get("module_path", ""), reason))
    return sites, nonlinear

"""Capture: trace a model into one torch.fx graph, with a leaf policy and each node's module path.

The tracer follows torchvision's ``feature_extraction`` tracer: every node records the qualified name of the
module it was created in (``node.meta["module_path"]``), so gate sites and errors can name where they are.

The leaf policy (which modules stay opaque, which are traced into or split) is :mod:`relu2dlgn.leaves`.

Shape-dependent Python control flow (timm's VGG ``ConvMlp``) cannot be traced symbolically. The tracer
first tries plain symbolic tracing (fast); if the model branches on a traced value it re-traces
*concretely*: every node also carries its value on an example input, branches on **shape-derived**
values are resolved with that value and guarded at run time (a mismatch raises
:class:`~relu2dlgn.errors.SpecialisationError` naming the module and how to re-convert), while branches on
tensor **data** raise :class:`~relu2dlgn.errors.ConversionError`.
"""
from __future__ import annotations

import linecache
import operator
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

try:  # run real code while tracing: torch.fx patches Module.__call__ and autowrapped functions
    from torch.fx._symbolic_trace import _maybe_revert_all_patches as _unpatched
except ImportError:  # pragma: no cover - older torch
    import contextlib

    _unpatched = contextlib.nullcontext

from .errors import ConversionError, SpecialisationError
from .leaves import contains_activation, split_norm_act, timm_notrace, training_dependent_types
from .utils.fx import fx_leaf
from .utils.modes import preserved_modes

_SELF_DIR = __file__.rsplit("/", 1)[0]
_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


@dataclass
class Guard:
    """A branch taken on a shape-derived value during concrete tracing."""

    node: fx.Node
    expected: Any
    module_path: str
    where: str


@dataclass
class Captured:
    """The result of tracing: one graph plus the modules/attributes its nodes refer to."""

    graph: fx.Graph
    modules: dict[str, Any]
    example_inputs: tuple | None
    guards: list[Guard] = field(default_factory=list)
    hidden: list[tuple[str, str]] = field(default_factory=list)
    train_differs: str | None = None


class _NeedsConcrete(Exception):
    """Raised by the plain tracer when the model needs concrete values (control flow on a traced value)."""

    def __init__(self, module_path: str, where: str, what: str):
        super().__init__(f"{what} at {module_path or '<root>'} ({where})")
        self.module_path, self.where, self.what = module_path, where, what


def _user_frame() -> str:
    """'file:line: code' of the innermost frame outside torch and relu2dlgn."""
    for fs in reversed(traceback.extract_stack()):
        if not fs.filename.startswith((_SELF_DIR, _TORCH_DIR)) and "<" not in fs.filename:
            line = (fs.line or linecache.getline(fs.filename, fs.lineno)).strip()
            return f"{fs.filename}:{fs.lineno}: {line}"
    return "<unknown>"


class _ProxyMixin:
    """Routes every implicit Python conversion of a proxy through the tracer."""

    def __getattr__(self, k: str):
        return _Attribute(self, k)

    def __len__(self) -> int:
        return self.tracer._concrete(self, len, "len() of a traced value")

    def __int__(self) -> int:
        return self.tracer._concrete(self, int, "int() of a traced value")

    def __index__(self) -> int:
        return self.tracer._concrete(self, int, "a traced value used as an index")

    def __float__(self) -> float:
        return self.tracer._concrete(self, float, "float() of a traced value")


def _inplace_operator(op: Callable) -> Callable:
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


# torch.fx proxies have no in-place operators, so Python turns `x += y` into `x = x + y`: the mutation of x
# (seen by every alias of x) is lost. Record augmented assignments as the in-place operators they are.
for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
              "ilshift", "irshift", "imatmul"):
    setattr(_ProxyMixin, f"__{_name}__", _inplace_operator(getattr(operator, _name)))


class _Proxy(_ProxyMixin, fx.Proxy):
    pass


class _Attribute(_ProxyMixin, fx.proxy.Attribute):
    pass


@fx_leaf
def _check_specialisation(actual: Any, expected: Any, module_path: str, where: str, example: str) -> None:
    """Run-time guard inserted after each branch that concrete tracing resolved."""
    if actual != expected:
        raise SpecialisationError(
            f"the converted graph was specialised for the example input(s) {example}: at module "
            f"'{module_path or '<root>'}' ({where}) the branch condition was {expected!r} but is {actual!r} "
            f"for this input. Re-convert with an example input of the shape you call it with, e.g. "
            f"relu2dlgn.convert(model, example_inputs=(torch.randn(<that shape>),), ...)."
        )


class CaptureTracer(fx.Tracer):
    """torch.fx tracer with relu2dlgn's leaf policy, module paths and (optionally) concrete values."""

    def __init__(self, leaf_modules: Iterable[type | str] = (), example_inputs: tuple | None = None,
                 concrete: bool = False):
        timm_leaves, timm_fns = timm_notrace()
        super().__init__(autowrap_functions=tuple(f for f in timm_fns if callable(f)),
                         param_shapes_constant=True)
        self.user_leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.user_leaf_paths = {p for p in leaf_modules if isinstance(p, str)}
        self.timm_leaves = tuple(timm_leaves)
        self.training_dependent = training_dependent_types()
        self.module_table: dict[str, nn.Module] = {}
        self.hidden: list[tuple[str, str]] = []
        self.concrete = concrete
        self.example_inputs = example_inputs
        self.values: dict[fx.Node, Any] = {}
        self.guards: list[Guard] = []
        self._placeholder_index = 0
        self.failed_path: str | None = None

    # -- leaf policy ---------------------------------------------------------------------------
    def _user_leaf(self, m: nn.Module, path: str) -> bool:
        return path in self.user_leaf_paths or isinstance(m, self.user_leaf_types)

    def is_leaf_module(self, m: nn.Module, path: str) -> bool:
        if self._user_leaf(m, path):
            return True
        if split_norm_act(m) is not None:
            return False
        if isinstance(m, self.training_dependent):
            return True
        if isinstance(m, self.timm_leaves):
            # timm's no-trace modules stay opaque unless they hide activations: then trace into them
            # (concrete tracing resolves the shape-dependent control flow that made timm mark them)
            return not contains_activation(m)
        return super().is_leaf_module(m, path)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        split = None if self._user_leaf(m, path) else split_norm_act(m)
        if split is not None:
            norm, after = split
            self.module_table[path] = norm

            def forward(*a: Any, **kw: Any) -> Any:
                x = self.create_proxy("call_module", path, a, kw)
                for child in after:
                    x = getattr(m, child)(x)
                return x
        elif self.is_leaf_module(m, path) and contains_activation(m):
            self.hidden.append((path, f"leaf module {type(m).__name__} contains activation modules that are "
                                      f"not converted to gates"))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = path
            raise

    # -- nodes ------------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def current_path(self) -> str:
        if not self.module_stack:
            return ""
        return next(reversed(self.module_stack.values()))[0]

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["module_path"] = target if kind == "call_module" else self.current_path()
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.concrete:
            self._record(proxy.node)
        return proxy

    # -- concrete values ---------------------------------------------------------------------------
    def _record(self, node: fx.Node) -> None:
        def val(a: Any) -> Any:
            return self.values[a] if isinstance(a, fx.Node) else a

        args = map_aggregate(node.args, val)
        kwargs = map_aggregate(node.kwargs, val)
        shape_only = False
        with torch.no_grad(), _unpatched():
            if node.op == "placeholder":
                value = self.example_inputs[self._placeholder_index]
                self._placeholder_index += 1
            elif node.op == "get_attr":
                value = _fetch(self.root, node.target)
            elif node.op == "call_module":
                mod = self.module_table.get(node.target) or self.root.get_submodule(node.target)
                value = mod(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
                shape_only = node.target in ("size", "dim", "numel", "nelement", "ndimension")
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
                shape_only = node.target is getattr and node.args[1] in ("shape", "ndim", "dtype", "device",
                                                                         "is_cuda", "layout")
            else:
                value = None
        if not shape_only and node.op in ("call_function", "call_method") and not isinstance(value, torch.Tensor):
            inputs = node.all_input_nodes
            shape_only = bool(inputs) and all(n.meta.get("shape_only", False) for n in inputs)
        node.meta["shape_only"] = shape_only
        self.values[node] = value

    def _concrete(self, proxy: fx.Proxy, convert: Callable, what: str) -> Any:
        where = _user_frame()
        path = self.current_path()
        if not self.concrete:
            raise _NeedsConcrete(path, where, what)
        node = proxy.node
        shape_query = convert is len and isinstance(self.values.get(node), torch.Tensor)
        if not (shape_query or node.meta.get("shape_only", False)):
            raise ConversionError(
                f"data-dependent control flow at module '{path or '<root>'}' ({where}): {what} depends on "
                f"tensor values, so no single graph represents the model. Mark the module as a leaf "
                f"(leaf_modules=('{path}',)) to keep it opaque, or rewrite it without Python branching on data."
            )
        value = convert(self.values[node])
        if convert is len:
            node = self.create_proxy("call_function", len, (proxy,), {}).node
        self.guards.append(Guard(node, value, path, where))
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self._concrete(obj, bool, "a branch on a traced value")

    def iter(self, obj: fx.Proxy):
        n = self._concrete(obj, len, "iteration over a traced value")
        return iter([obj[i] for i in range(n)])


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """An example input when the user gives none: timm's ``pretrained_cfg['input_size']`` (batch 1), else
    the geometry of the first convolution or linear layer, else ``None``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (torch.randn(1, *cfg["input_size"]),)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (torch.randn(1, m.in_channels, 224, 224),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(1, m.in_channels, 224),)
        if isinstance(m, nn.Conv3d):
            return (torch.randn(1, m.in_channels, 16, 112, 112),)
        if isinstance(m, nn.Linear):
            return (torch.randn(1, m.in_features),)
    return None


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None,
            leaf_modules: Iterable[type | str] = ()) -> Captured:
    """Trace ``model`` into a :class:`Captured` graph of its eval-mode forward.

    ``model`` is not modified: it is traced in eval mode and every module's training flag is restored after.

    Raises :class:`ConversionError` naming the module path, the reason and the remedy when tracing fails.
    """
    leaf_modules = tuple(leaf_modules)
    for lm in leaf_modules:
        if not isinstance(lm, (type, str)):
            raise ConversionError(f"leaf_modules entries must be module types or module paths, got {lm!r}")
    with preserved_modes(model):
        return _capture(model.eval(), tuple(example_inputs) if example_inputs is not None else None,
                        leaf_modules)


def _capture(root: nn.Module, examples: tuple | None, leaf_modules: tuple) -> Captured:
    try:
        cap = _trace(root, leaf_modules, examples, concrete=False)
        cap.train_differs = _train_graph_difference(root, leaf_modules, cap.graph)
        return cap
    except _NeedsConcrete as need:
        if examples is None:
            examples = default_example_inputs(root)
            if examples is not None:
                examples = tuple(e.to(_device_of(root)) for e in examples)
        if examples is None:
            raise ConversionError(
                f"module '{need.module_path or '<root>'}' needs concrete shapes to trace ({need.what}, "
                f"{need.where}); pass example_inputs=(an input tensor,) to relu2dlgn.convert"
            ) from None
        return _trace(root, leaf_modules, examples, concrete=True)


def _train_graph_difference(root: nn.Module, leaf_modules: tuple, eval_graph: fx.Graph) -> str | None:
    """Module path where the train-mode trace first differs from the eval-mode one (``None`` if identical).

    Forwards that branch on ``self.training`` (auxiliary heads, dropout written as Python branches) give
    different graphs; the converted model follows the eval-mode graph, so this is reported."""
    root.train()
    try:
        train_graph = CaptureTracer(leaf_modules).trace(root)
    except Exception:
        return "<root> (the model cannot be traced in train mode)"
    finally:
        root.eval()
    a = [(n.op, str(n.target), n.meta.get("module_path", "")) for n in eval_graph.nodes]
    b = [(n.op, str(n.target), n.meta.get("module_path", "")) for n in train_graph.nodes]
    if a == b:
        return None
    for x, y in zip(a, b):
        if x != y:
            return y[2] or x[2] or "<root>"
    return (b[len(a)][2] if len(b) > len(a) else a[len(b)][2]) or "<root>"


def _trace(root: nn.Module, leaf_modules: tuple, examples: tuple | None, concrete: bool) -> Captured:
    tracer = CaptureTracer(leaf_modules, examples, concrete)
    try:
        graph = tracer.trace(root)
    except (_NeedsConcrete, ConversionError):
        raise
    except Exception as exc:
        path = tracer.failed_path if tracer.failed_path is not None else tracer.current_path()
        where = path or "<root>"
        mod = root.get_submodule(path) if path else root
        raise ConversionError(
            f"cannot trace module '{where}' ({type(mod).__name__}): {type(exc).__name__}: {exc}. "
            f"Remedy: keep it opaque with relu2dlgn.convert(..., leaf_modules=('{path}',)) or "
            f"leaf_modules=({type(mod).__name__},) (activations inside it are then not gates)."
        ) from exc
    modules: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            modules[node.target] = tracer.module_table.get(node.target) or root.get_submodule(node.target)
        elif node.op == "get_attr":
            modules[node.target] = _fetch(root, node.target)
    example = ", ".join(str(tuple(e.shape)) for e in examples) if examples else ""
    for guard in tracer.guards:
        with graph.inserting_after(guard.node):
            check = graph.call_function(_check_specialisation,
                                        (guard.node, guard.expected, guard.module_path, guard.where, example))
            check.meta["module_path"] = guard.module_path
            check.meta["guard"] = True
    return Captured(graph=graph, modules=modules, example_inputs=examples, guards=tracer.guards,
                    hidden=tracer.hidden)

"""The tracer: torch.fx's, with relu2dlgn's leaf policy, each node's module path and grad mode, and (when asked)
concrete values.

The tracer follows torchvision's ``feature_extraction`` tracer: every node records the qualified name of the
module it was created in (``node.meta["module_path"]``), so gate sites and errors can name where they are,
and the grad mode it was created in (``node.meta["grad_enabled"]``, see :mod:`relu2dlgn.context`). The leaf
policy (which modules stay opaque, which are traced into or split) is :mod:`relu2dlgn.leaves`.

In *concrete* mode every node also carries its value on an example input: branches on **shape-derived**
values are resolved with that value and recorded as :class:`Guard` s (checked at run time by
:func:`_check_specialisation`), while branches on tensor **data** raise
:class:`~relu2dlgn.errors.ConversionError`. :mod:`relu2dlgn.capture` decides when to trace concretely.
"""
from __future__ import annotations

import contextlib
import linecache
import operator
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

try:  # run real code while tracing: torch.fx patches Module.__call__ and autowrapped functions
    from torch.fx._symbolic_trace import _maybe_revert_all_patches as _unpatched
except ImportError:  # pragma: no cover - older torch
    _unpatched = contextlib.nullcontext

from .context import compiled_original
from .errors import ConversionError, SpecialisationError
from .leaves import contains_activation, split_norm_act, timm_notrace, training_dependent_types
from .utils.fx import fx_leaf

_SELF_DIR = __file__.rsplit("/", 1)[0]
_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


@dataclass
class Guard:
    """A branch taken on a shape-derived value during concrete tracing."""

    node: fx.Node
    expected: Any
    module_path: str
    where: str


class NeedsConcrete(Exception):
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

    def __setitem__(self, key: Any, value: Any) -> None:  # torch.fx proxies have no item assignment
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


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


@contextlib.contextmanager
def _autocast_accepting_proxies(root: Any) -> Iterator[None]:
    """While tracing, let ``torch.autocast(device_type=x.device.type)`` take a traced device type (timm's
    ``LiteMLA``): it becomes the device type of the model's parameters. torch.fx records no context manager, so
    the region is not in the graph either way (the converted graph computes in its inputs' dtype)."""
    original = torch.autocast

    def autocast(device_type: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(device_type, str):
            device_type = next((t.device.type for t in root.parameters()), "cpu") if isinstance(root, nn.Module) \
                else "cpu"
        return original(device_type, *args, **kwargs)

    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = original


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
        self.traced_timm_leaves: list[str] = []

    # -- leaf policy ---------------------------------------------------------------------------
    def _user_leaf(self, m: nn.Module, path: str) -> bool:
        return path in self.user_leaf_paths or isinstance(m, self.user_leaf_types)

    def is_leaf_module(self, m: nn.Module, path: str) -> bool:
        if self._user_leaf(m, path) or isinstance(m, torch.jit.ScriptModule):  # TorchScript: opaque
            return True
        if split_norm_act(m) is not None:
            return False
        if isinstance(m, self.training_dependent):
            return True
        if isinstance(m, self.timm_leaves):
            # timm's no-trace modules stay opaque unless they hide activations: then trace into them
            # (concrete tracing resolves the shape-dependent control flow that made timm mark them)
            if contains_activation(m):
                self.traced_timm_leaves.append(path)
                return False
            return True
        return super().is_leaf_module(m, path)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _autocast_accepting_proxies(root):
            return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        orig = compiled_original(m)
        if orig is not None:  # a torch.compile'd submodule: trace the module it wraps
            return orig(*args, **kwargs)
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
        node.meta["grad_enabled"] = torch.is_grad_enabled()  # the source's grad mode (context.keep_grad_regions)
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.concrete:
            self._record(proxy.node)
        return proxy

    # -- concrete values ---------------------------------------------------------------------------
    def _record(self, node: fx.Node) -> None:
        def val(a: Any) -> Any:
            if isinstance(a, fx.Node) and a not in self.values and a.op == "get_attr":
                self.values[a] = fetch(self.root, a.target)  # buffers torch.fx adds without a proxy
            return self.values[a] if isinstance(a, fx.Node) else a

        args = map_aggregate(node.args, val)
        kwargs = map_aggregate(node.kwargs, val)
        shape_only = False
        with torch.no_grad(), _unpatched():
            if node.op == "placeholder":  # an example input, or the default of an argument fixed at it
                i = self._placeholder_index
                value = self.example_inputs[i] if i < len(self.example_inputs) else (node.args or (None,))[0]
                self._placeholder_index += 1
            elif node.op == "get_attr":
                value = fetch(self.root, node.target)
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
            raise NeedsConcrete(path, where, what)
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


def fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

"""Capture: trace a model into one torch.fx graph (:mod:`relu2dlgn.tracer`), with a leaf policy and each node's
module path.

Shape-dependent Python control flow (timm's VGG ``ConvMlp``) cannot be traced symbolically. Capture first
tries plain symbolic tracing (fast); if the model branches on a traced value it re-traces *concretely* on an
example input: branches on **shape-derived** values are resolved and guarded at run time (a mismatch raises
:class:`~relu2dlgn.errors.SpecialisationError` naming the module and how to re-convert), while branches on
tensor **data** raise :class:`~relu2dlgn.errors.ConversionError`. A timm no-trace module that capture traces
into (because it hides activations) and that cannot be traced is kept opaque, as timm keeps it.

What the forward depends on beyond its ops (hooks, default arguments, grad-mode regions, a torch.compile
wrapper) is handled by :mod:`relu2dlgn.context`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .context import check_hooks, drop_fixed_arguments, fixed_defaults, keep_grad_regions, unwrap_compiled
from .errors import ConversionError
from .tracer import CaptureTracer, Guard, NeedsConcrete, _check_specialisation, fetch  # noqa: F401
from .utils.modes import preserved_modes

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """The result of tracing: one graph plus the modules/attributes its nodes refer to."""

    graph: fx.Graph
    modules: dict[str, Any]
    example_inputs: tuple | None
    guards: list[Guard] = field(default_factory=list)
    hidden: list[tuple[str, str]] = field(default_factory=list)
    train_differs: str | None = None
    fixed: list[str] = field(default_factory=list)


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
    A ``torch.compile`` wrapper is unwrapped; forward arguments with a default that ``example_inputs`` does
    not cover are fixed at it; grad-mode regions are kept (see :mod:`relu2dlgn.context`).

    Raises :class:`ConversionError` naming the module path, the reason and the remedy when tracing fails, and
    naming the module when one has a hook.
    """
    leaf_modules = tuple(leaf_modules)
    for lm in leaf_modules:
        if not isinstance(lm, (type, str)):
            raise ConversionError(f"leaf_modules entries must be module types or module paths, got {lm!r}")
    model = unwrap_compiled(model)
    check_hooks(model)
    examples = tuple(example_inputs) if example_inputs is not None else None
    fixed = fixed_defaults(model, len(examples) if examples is not None else None)
    with preserved_modes(model):
        return _capture(model.eval(), examples, leaf_modules, fixed)


class _OpaqueRetry(Exception):
    """A timm no-trace module that was traced into (it hides activations) cannot be traced: keep it opaque."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(path)
        self.path, self.cause = path, cause


def _capture(root: nn.Module, examples: tuple | None, leaf_modules: tuple, fixed: dict[str, Any]) -> Captured:
    opaque: dict[str, str] = {}
    while True:
        try:
            cap = _capture_once(root, examples, leaf_modules + tuple(opaque), fixed)
        except _OpaqueRetry as retry:
            if retry.path in opaque:  # pragma: no cover - an opaque leaf cannot fail inside itself
                raise ConversionError(f"cannot trace module '{retry.path}' even as an opaque leaf: "
                                      f"{type(retry.cause).__name__}: {retry.cause}") from retry.cause
            cause = f"{type(retry.cause).__name__}: {str(retry.cause).splitlines()[0][:200]}"
            log.warning("timm module '%s' cannot be traced into (%s); keeping it opaque as timm does", retry.path,
                        cause)
            opaque[retry.path] = cause
            continue
        cap.hidden = [(p, f"timm no-trace module {type(root.get_submodule(p)).__name__} could not be traced "
                          f"into ({opaque[p]}); kept opaque, its activations are not gates") if p in opaque else
                      (p, r) for p, r in cap.hidden]
        return cap


def _capture_once(root: nn.Module, examples: tuple | None, leaf_modules: tuple, fixed: dict[str, Any]) -> Captured:
    try:
        cap = _trace(root, leaf_modules, examples, fixed, concrete=False)
        cap.train_differs = _train_graph_difference(root, leaf_modules, fixed, cap.graph)
        return cap
    except NeedsConcrete as need:
        if examples is None:
            examples = default_example_inputs(root)
            if examples is not None:
                examples = tuple(e.to(_device_of(root)) for e in examples)
        if examples is None:
            raise ConversionError(
                f"module '{need.module_path or '<root>'}' needs concrete shapes to trace ({need.what}, "
                f"{need.where}); pass example_inputs=(an input tensor,) to relu2dlgn.convert"
            ) from None
        return _trace(root, leaf_modules, examples, fixed, concrete=True)


def _train_graph_difference(root: nn.Module, leaf_modules: tuple, fixed: dict[str, Any],
                            eval_graph: fx.Graph) -> str | None:
    """Module path where the train-mode trace first differs from the eval-mode one (``None`` if identical).

    Forwards that branch on ``self.training`` (auxiliary heads, dropout written as Python branches) give
    different graphs; the converted model follows the eval-mode graph, so this is reported."""
    root.train()
    try:
        with torch.enable_grad():
            train_graph = CaptureTracer(leaf_modules).trace(root, concrete_args=dict(fixed) or None)
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


def _trace(root: nn.Module, leaf_modules: tuple, examples: tuple | None, fixed: dict[str, Any],
           concrete: bool) -> Captured:
    tracer = CaptureTracer(leaf_modules, examples, concrete)
    try:
        with torch.enable_grad():  # record the source's own grad-mode regions, whatever the caller's mode
            graph = tracer.trace(root, concrete_args=dict(fixed) or None)
    except NeedsConcrete:
        raise
    except Exception as exc:
        path = tracer.failed_path if tracer.failed_path is not None else tracer.current_path()
        inside = [p for p in tracer.traced_timm_leaves if path == p or path.startswith(p + ".")]
        if inside:
            raise _OpaqueRetry(max(inside, key=len), exc) from exc
        if isinstance(exc, ConversionError):
            raise
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
            modules[node.target] = fetch(root, node.target)
    example = ", ".join(str(tuple(e.shape)) for e in examples) if examples else ""
    for guard in tracer.guards:
        with graph.inserting_after(guard.node):
            check = graph.call_function(_check_specialisation,
                                        (guard.node, guard.expected, guard.module_path, guard.where, example))
            check.meta["module_path"] = guard.module_path
            check.meta["guard"] = True
    fixed_notes = drop_fixed_arguments(graph, fixed)
    keep_grad_regions(graph)
    return Captured(graph=graph, modules=modules, example_inputs=examples, guards=tracer.guards,
                    hidden=tracer.hidden, fixed=fixed_notes)

"""What a source model's forward depends on beyond the ops torch.fx records, and how the graphs keep it or why
conversion refuses it.

* **torch.compile wrappers** (``OptimizedModule``) are unwrapped: the module they wrap is converted.
* **Module hooks** are refused, naming the module: a graph cannot carry them (a hook on an activation would
  vanish with the activation, one on the root is never called by the tracer, one on any other module would
  run in both the gating and the value graph, and a traced-through hook's side effects would happen once, at
  conversion). ``torch.nn.utils.weight_norm``'s pre-hook, which only recomputes the weight, is allowed.
* **Arguments with a default** that the example inputs do not cover (``forward(self, x, mask=None)``) are
  fixed at their default: the converted model takes the covered arguments only, as ``model(x)`` is called.
  Covered arguments are inputs without a default (generated code puts the gates after them).
* **Grad-mode regions** (``with torch.no_grad():`` in forward) are kept: the tracer records each node's grad
  mode and :func:`keep_grad_regions` brackets every run of nodes traced with grad disabled by
  :func:`grad_off` / :func:`grad_restore`, which restore the caller's mode at the end of the region (an
  exception inside a region leaves grad disabled, as an exception inside ``torch.no_grad()`` does not:
  regions are expected to run to completion). ``torch.inference_mode()`` regions become no-grad regions;
  ``torch.enable_grad()`` regions are not recorded (the model is traced with grad enabled), and neither are
  ``torch.autocast`` regions (see :mod:`relu2dlgn.tracer`).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .utils.fx import fx_leaf

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------

def compiled_original(m: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper wraps, or ``None`` if ``m`` is not one."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        return None
    if isinstance(m, OptimizedModule):
        orig = getattr(m, "_orig_mod", None)
        return orig if isinstance(orig, nn.Module) else None
    return None


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """``model`` itself, or the module its ``torch.compile`` wrapper(s) wrap."""
    orig = compiled_original(model)
    while orig is not None:
        log.info("converting the module wrapped by torch.compile (%s)", type(orig).__name__)
        model, orig = orig, compiled_original(orig)
    return model


# --------------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------------

_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def _harmless(hook: Any) -> bool:
    try:
        from torch.nn.utils.weight_norm import WeightNorm
    except Exception:  # pragma: no cover
        return False
    return isinstance(hook, WeightNorm)


def check_hooks(model: nn.Module) -> None:
    """Raise :class:`ConversionError` naming the first module (root included) that has a module hook."""
    for path, m in model.named_modules(remove_duplicate=False):
        for attr, kind in _HOOK_KINDS:
            hooks = getattr(m, attr, None) or {}
            for hook in hooks.values():
                if _harmless(hook):
                    continue
                name = getattr(hook, "__qualname__", None) or type(hook).__name__
                raise ConversionError(
                    f"module '{path or '<root>'}' ({type(m).__name__}) has a {kind} ({name}): relu2dlgn's gating "
                    f"and value graphs cannot carry module hooks (on an activation the hook would vanish with "
                    f"the activation, on other modules it would run in both graphs, on the root never); remove "
                    f"it before converting (handle.remove()) and register it on the converted model's modules "
                    f"(dlgn.gating / dlgn.value) if you need it there")


# --------------------------------------------------------------------------------------------------
# default arguments
# --------------------------------------------------------------------------------------------------

_FIXABLE = (type(None), bool, int, float, str)


def fixed_defaults(model: nn.Module, num_inputs: int | None) -> dict[str, Any]:
    """The forward arguments to fix at their default: those with a simple default (None, bool, number,
    string) beyond the first ``num_inputs`` (all of them when no example inputs are given: ``None``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}
    out: dict[str, Any] = {}
    for i, p in enumerate(params):
        covered = num_inputs is not None and i < num_inputs and p.kind != p.KEYWORD_ONLY
        if not covered and p.default is not p.empty and isinstance(p.default, _FIXABLE):
            out[p.name] = p.default
    return out


def drop_fixed_arguments(graph: fx.Graph, fixed: dict[str, Any]) -> list[str]:
    """Remove the placeholders torch.fx made for ``concrete_args`` (and the checks it attached to them), and the
    default of every remaining placeholder. Returns the fixed arguments, described."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    done = []
    for ph in placeholders[len(placeholders) - len(fixed):] if fixed else []:
        users: list[fx.Node] = []
        stack = list(ph.users)
        while stack:
            u = stack.pop()
            if u not in users:
                users.append(u)
                stack.extend(u.users)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for u in sorted(users, key=order.__getitem__, reverse=True):
            graph.erase_node(u)
        done.append(ph.target)
        graph.erase_node(ph)
    for ph in graph.nodes:
        if ph.op == "placeholder":
            ph.args = ()
    return [f"argument '{name}' fixed at its default {value!r} (pass it in example_inputs to make it an input)"
            for name, value in fixed.items()]


# --------------------------------------------------------------------------------------------------
# grad-mode regions
# --------------------------------------------------------------------------------------------------

@fx_leaf
def grad_off(anchor: Any) -> bool:
    """Start of a region the source runs without grad: disable grad, return the caller's mode. ``anchor`` (the
    graph's first input) only ties the call to the graph, so that re-tracing the generated code records it."""
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    return previous


@fx_leaf
def grad_restore(previous: bool, anchor: Any) -> None:
    """End of a region: restore the caller's grad mode."""
    torch.set_grad_enabled(previous)


GRAD_MODE_FUNCTIONS = (grad_off, grad_restore)


def keep_grad_regions(graph: fx.Graph) -> int:
    """Bracket every run of nodes traced with grad disabled (``node.meta["grad_enabled"] is False``) by
    :func:`grad_off` / :func:`grad_restore`; nodes without the flag (added after tracing) extend a run. Returns
    the number of regions."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return 0
    anchor = placeholders[0]
    runs: list[tuple[fx.Node, fx.Node]] = []
    start = last = None
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        flag = n.meta.get("grad_enabled")
        if flag is False:
            start = start or n
            last = n
        elif flag is True and start is not None:
            runs.append((start, last))
            start = last = None
    if start is not None:
        runs.append((start, last))
    for first, end in runs:
        with graph.inserting_before(first):
            prev = graph.call_function(grad_off, (anchor,))
        with graph.inserting_after(end):
            restore = graph.call_function(grad_restore, (prev, anchor))
        for node in (prev, restore):
            node.meta = {"module_path": first.meta.get("module_path", ""), "grad_mode": True}
    return len(runs)

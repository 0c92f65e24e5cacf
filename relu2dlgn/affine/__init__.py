"""The allow-list of a strict DLGN: the operations known to be affine in the model's input.

A DLGN is only a DLGN if its gating network is affine in the input. Nothing is assumed: every node of the
traced graph that carries input-dependent data and is not a gate site must be on this list, with its argument
conditions met; everything else is a *non-gate nonlinearity* (:func:`non_affine` names it) — refused by a
strict conversion, kept and reported with ``strict=False``. The list is written for **eval mode** (batch
norm with its running statistics, dropout off); in train mode a DLGN's gating network normalises with batch
statistics, which is accepted and not affine (:mod:`relu2dlgn.verify` checks eval mode). The numeric check
in :mod:`relu2dlgn.verify` backs the list up at every conversion.

Categories (an *operand* is a tensor argument; "fixed" means it must not depend on the input data: a
parameter, buffer, constant or shape query):

* **linear layers** — convolutions and transposed convolutions, ``Linear``, ``Bilinear``, matrix products
  (``matmul``, ``mm``, ``bmm``, ``einsum``, ``tensordot``, ``addmm``, ...): at most one of the multiplied
  operands depends on the input;
* **normalisation with fixed statistics** — batch norm that tracks running statistics (``F.batch_norm`` with
  ``training=False`` and running statistics given);
* **affine arithmetic** — add/sub/neg of any operands (``alpha`` fixed); mul by one input-dependent operand
  (the other fixed); div by a fixed divisor; ``lerp`` with a fixed weight; ``addcmul``/``addcdiv`` with one
  input-dependent factor and a fixed divisor; ``where`` with a fixed condition; ``masked_fill`` with a fixed
  mask and value;
* **data movement** — concatenation, stacking, splitting, views/reshapes, permutes/transposes, squeeze,
  expand/repeat, flips/rolls, indexing and gathering with fixed indices, index assignment, ``copy_``,
  ``clone``/``detach``/``contiguous``, floating-point dtype and device conversions, pixel (un)shuffle,
  (un)fold;
* **padding** — constant padding with a finite value, reflect/replicate/circular padding;
* **pooling and resampling** — average and adaptive-average pooling, interpolation and upsampling (every mode
  is a fixed linear combination of input entries), ``grid_sample`` with a fixed grid, the DLGN's own
  max-pool stand-in;
* **reductions** — ``sum``, ``mean``, ``cumsum``, ``trace``, ``diff``;
* **identity in eval mode** — ``Identity``, dropout (``training=False``), timm's ``DropPath``/``DropBlock2d``,
  torchvision's ``StochasticDepth``.

Not data at all (never flagged): placeholders, parameters and buffers (``get_attr``), shape and metadata
queries (``x.size()``, ``x.shape``, ``x.dtype``, ...), tensors made from shapes only (``zeros_like``,
``new_ones``, ...), guards (``torch._assert``, the capture's ``_check_specialisation``) and grad-mode
switches (:mod:`relu2dlgn.context`).

A module call is on the list only if the module's class is listed *and* its ``forward`` is that class's own
(a subclass overriding ``forward`` may do anything). Opaque leaves — TorchScript modules, user
``leaf_modules``, timm's no-trace modules — are therefore unknown unless listed (timm's ``Conv2dSame``,
``AvgPool2dSame``, ``StdConv2dSame`` and ``ScaledStdConv2dSame`` are: zero "same" padding + a linear op).
Random ops (``torch.rand*``, ``bernoulli``, ``dropout(training=True)``) are never affine: the gating network
would not even be a function.

The rules are :mod:`relu2dlgn.affine.functions` (functions and ``Tensor`` methods) and
:mod:`relu2dlgn.affine.modules` (module classes); which nodes depend on the input is
:mod:`relu2dlgn.dependence`; how ops are named, :mod:`relu2dlgn.opnames`.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from ..dependence import shape_only
from ..opnames import op_name
from .functions import ARITH, Rule, function_rules, method_rules
from .modules import module_rule

# --------------------------------------------------------------------------------------------------
# not data: metadata, shape-only constructors, guards
# --------------------------------------------------------------------------------------------------

def _guards() -> set[Callable]:
    from ..context import GRAD_MODE_FUNCTIONS
    from ..tracer import _check_specialisation  # the tracer imports sites (leaves), which imports this module

    out: set[Callable] = {torch._assert, _check_specialisation, *GRAD_MODE_FUNCTIONS}
    for name in ("_assert_is_none",):
        fn = getattr(torch.fx._symbolic_trace, name, None)
        if fn is not None:
            out.add(fn)
    if hasattr(torch, "_check"):
        out.add(torch._check)
    return out


_RANDOM_FUNCTIONS = {getattr(torch, n) for n in ("rand", "randn", "randint", "rand_like", "randn_like",
                                                 "randint_like", "randperm", "bernoulli", "normal", "multinomial",
                                                 "poisson") if hasattr(torch, n)}
_RANDOM_METHODS = {"random_", "uniform_", "normal_", "bernoulli", "bernoulli_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "multinomial"}

_FUNCTION_RULES: dict[Callable, Rule] | None = None
_METHOD_RULES = method_rules()
_GUARDS: set[Callable] | None = None


def _depends(value: Any, dep: dict[fx.Node, bool]) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        if isinstance(a, fx.Node) and dep.get(a, False):
            found = True
        return a

    map_aggregate(value, visit)
    return found


def _slot_values(node: fx.Node, rule: Rule) -> tuple[list[Any], list[Any]]:
    """(values of the fixed arguments, values of the product operands) of ``node`` under ``rule``."""
    linear_pos = {p for p, _ in rule.linear}
    linear_names = {n for _, n in rule.linear}
    product_pos = {p for p, _ in rule.product}
    product_names = {n for _, n in rule.product}
    product, fixed = [], []
    for i, a in enumerate(node.args):
        rest = rule.rest is not None and i >= rule.rest
        if not (i in linear_pos or rest):
            fixed.append(a)
        if i in product_pos or rest:
            product.append(a)
    for k, a in node.kwargs.items():
        if k not in linear_names:
            fixed.append(a)
        if k in product_names:
            product.append(a)
    return fixed, product


def non_affine(node: fx.Node, modules: dict[str, Any], dep: dict[fx.Node, bool]) -> str | None:
    """What makes this node not affine in the input (the op's name and the violated condition), or ``None`` when
    it is on the allow-list with its conditions met or does not depend on the input. Gate sites are not asked."""
    global _FUNCTION_RULES, _GUARDS
    if node.op in ("placeholder", "get_attr", "output"):
        return None
    if _GUARDS is None:
        _GUARDS = _guards()
    if node.op == "call_function" and node.target in _GUARDS:
        return None
    random = (node.op == "call_function" and node.target in _RANDOM_FUNCTIONS) or (
        node.op == "call_method" and node.target in _RANDOM_METHODS)
    if random:
        return f"{op_name(node, modules)} (random)"
    if not dep.get(node, False) or shape_only(node):
        return None
    name = op_name(node, modules)
    if node.op == "call_module":
        return _module_violation(node, modules[node.target], dep, name)
    if node.op == "call_function":
        if _FUNCTION_RULES is None:
            _FUNCTION_RULES = function_rules()
        try:
            rule = _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            rule = None
    else:
        rule = _METHOD_RULES.get(node.target)
    if rule is None:
        return name
    return _violation(node, rule, dep, name)


def _violation(node: fx.Node, rule: Rule, dep: dict[fx.Node, bool], name: str) -> str | None:
    fixed, product = _slot_values(node, rule)
    if sum(_depends(a, dep) for a in product) >= 2:
        return f"{name} of two input-dependent tensors"
    if any(_depends(a, dep) for a in fixed):
        if node.target in (operator.truediv, operator.itruediv) or rule.category == ARITH and "div" in str(node.target):
            return f"{name} by an input-dependent tensor"
        return f"{name} with an input-dependent {_fixed_role(node, rule, dep)}"
    if rule.check is not None:
        problem = rule.check(node)
        if problem is not None:
            return f"{name} {problem}"
    return None


def _fixed_role(node: fx.Node, rule: Rule, dep: dict[fx.Node, bool]) -> str:
    linear_pos = {p for p, _ in rule.linear}
    names = rule.names.split()
    for i, a in enumerate(node.args):
        if i not in linear_pos and not (rule.rest is not None and i >= rule.rest) and _depends(a, dep):
            return names[i] if i < len(names) else f"argument {i}"
    for k, a in node.kwargs.items():
        if _depends(a, dep):
            return f"argument '{k}'"
    return "argument"


def _module_violation(node: fx.Node, m: nn.Module, dep: dict[fx.Node, bool], name: str) -> str | None:
    rule = module_rule(m)
    if rule is None:
        return name
    operands = list(node.args[:rule.operands])
    if any(_depends(a, dep) for a in list(node.args[rule.operands:]) + list(node.kwargs.values())):
        return f"{name} with an input-dependent extra argument"
    if rule.product and sum(_depends(a, dep) for a in operands) >= 2:
        return f"{name} of two input-dependent tensors"
    if rule.check is not None:
        problem = rule.check(m)
        if problem is not None:
            return f"{name} {problem}"
    return None

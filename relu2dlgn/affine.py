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

Data dependence follows storage: a tensor that an in-place op, ``out=`` or index assignment fills with
input-dependent data is input-dependent from then on (:mod:`relu2dlgn.aliases`).
"""
from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate

from . import gates as G
from .aliases import alias_analysis, is_shape_query, written_input

# --------------------------------------------------------------------------------------------------
# not data: metadata, shape-only constructors, guards
# --------------------------------------------------------------------------------------------------

_SHAPE_ONLY_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, len}
_SHAPE_ONLY_METHODS = {"new_zeros", "new_ones", "new_empty"}


def _guards() -> set[Callable]:
    from .context import GRAD_MODE_FUNCTIONS
    from .tracer import _check_specialisation  # the tracer imports sites (leaves), which imports this module

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

# --------------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------------

Slot = tuple[int, str]  # an operand: its position and its keyword name


@dataclass(frozen=True)
class Rule:
    """When an op is affine in the input: only the operands in ``linear`` may depend on the input (every other
    argument is fixed); among ``product`` (a subset of ``linear``) at most one may; ``rest`` makes every
    positional argument from that index on a linear operand (``einsum``'s operands, ``Tensor.view``'s sizes are
    not: they are fixed); ``check`` tests further constant arguments and returns what is wrong, or ``None``;
    ``names`` names the positional arguments for messages."""

    category: str
    linear: tuple[Slot, ...] = ((0, "input"),)
    product: tuple[Slot, ...] = ()
    rest: int | None = None
    check: Callable[[fx.Node], str | None] | None = None
    names: str = ""  # positional argument names, to say which fixed argument depends on the input


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if pos < len(node.args) else default


def _training_off(pos: int, default: bool) -> Callable[[fx.Node], str | None]:
    def check(node: fx.Node) -> str | None:
        return "with training=True (random)" if _arg(node, pos, "training", default) is not False else None
    return check


def _batch_norm_check(node: fx.Node) -> str | None:
    if _arg(node, 5, "training", False) is not False:
        return "with training=True (batch statistics)"
    if _arg(node, 1, "running_mean") is None or _arg(node, 2, "running_var") is None:
        return "without running statistics (batch statistics)"
    return None


def _pad_check(node: fx.Node) -> str | None:
    value = _arg(node, 3, "value", None)
    if _arg(node, 2, "mode", "constant") == "constant" and isinstance(value, (int, float)) \
            and not math.isfinite(value):
        return f"with the non-finite value {value}"
    return None


def _div_check(node: fx.Node) -> str | None:
    mode = _arg(node, 2, "rounding_mode", None)
    return f"with rounding_mode={mode!r}" if mode is not None else None


def _float_dtype_check(node: fx.Node) -> str | None:
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        if isinstance(a, torch.dtype) and not a.is_floating_point:
            return f"to {a}"
    return None


_X = ((0, "input"),)
_SELF = ((0, "self"),)
_XY = ((0, "input"), (1, "other"))
_AB = ((0, "self"), (1, "other"))

LINEAR = "linear layer"
NORM = "normalisation with fixed statistics"
ARITH = "affine arithmetic"
MOVE = "data movement"
PAD = "padding"
POOL = "pooling and resampling"
REDUCE = "reduction"
IDENTITY = "identity in eval mode"


def _fns(names: str, module: Any = torch) -> list[Callable]:
    return [getattr(module, n) for n in names.split() if hasattr(module, n)]


def _function_rules() -> dict[Callable, Rule]:
    rules: dict[Callable, Rule] = {}

    def put(fns: list[Callable], rule: Rule) -> None:
        for fn in fns:
            rules[fn] = rule

    # linear layers: products of operands, at most one of them input-dependent
    conv = Rule(LINEAR, ((0, "input"), (1, "weight"), (2, "bias")), ((0, "input"), (1, "weight"), (2, "bias")))
    put(_fns("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d") +
        _fns("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear", F), conv)
    put(_fns("bilinear", F), Rule(LINEAR, ((0, "input1"), (1, "input2"), (2, "weight"), (3, "bias")),
                                  ((0, "input1"), (1, "input2"), (2, "weight"), (3, "bias"))))
    two = ((0, "input"), (1, "other"))
    put(_fns("matmul mm bmm mv dot inner outer ger kron") + [operator.matmul, operator.imatmul],
        Rule(LINEAR, two, two))
    put(_fns("tensordot"), Rule(LINEAR, ((0, "a"), (1, "b")), ((0, "a"), (1, "b"))))
    put(_fns("einsum"), Rule(LINEAR, (), (), rest=1))
    addmm = ((0, "input"), (1, "mat1"), (2, "mat2"))
    put(_fns("addmm baddbmm addbmm addmv addr"), Rule(LINEAR, addmm, addmm[1:]))
    # normalisation with fixed statistics
    put(_fns("batch_norm", F), Rule(NORM, _X, check=_batch_norm_check))
    # affine arithmetic
    put([operator.add, operator.iadd, operator.sub, operator.isub], Rule(ARITH, ((0, "a"), (1, "b"))))
    put([operator.neg, operator.pos], Rule(ARITH, ((0, "a"),)))
    put(_fns("add sub subtract"), Rule(ARITH, _XY))
    put(_fns("neg negative positive"), Rule(ARITH, _X))
    put([operator.mul, operator.imul], Rule(ARITH, ((0, "a"), (1, "b")), ((0, "a"), (1, "b"))))
    put(_fns("mul multiply"), Rule(ARITH, _XY, _XY))
    put([operator.truediv, operator.itruediv], Rule(ARITH, ((0, "a"),)))
    put(_fns("div divide true_divide"), Rule(ARITH, _X, check=_div_check))
    put(_fns("lerp"), Rule(ARITH, ((0, "input"), (1, "end"))))
    put(_fns("addcmul"), Rule(ARITH, ((0, "input"), (1, "tensor1"), (2, "tensor2")), ((1, "tensor1"), (2, "tensor2"))))
    put(_fns("addcdiv"), Rule(ARITH, ((0, "input"), (1, "tensor1"))))
    put(_fns("where"), Rule(ARITH, ((1, "input"), (2, "other")), names="condition"))
    put(_fns("masked_fill"), Rule(ARITH, _X, names="input mask value"))
    # data movement
    put(_fns("cat concat concatenate stack hstack vstack dstack column_stack row_stack"),
        Rule(MOVE, ((0, "tensors"),)))
    put(_fns("flatten unflatten reshape squeeze unsqueeze permute transpose swapaxes swapdims movedim moveaxis t "
             "narrow select roll flip fliplr flipud rot90 repeat_interleave tile "
             "broadcast_to diagonal diag_embed tril triu split chunk tensor_split unbind hsplit vsplit dsplit "
             "clone detach ravel atleast_1d atleast_2d atleast_3d pixel_shuffle pixel_unshuffle channel_shuffle"),
        Rule(MOVE))
    put(_fns("pixel_shuffle pixel_unshuffle channel_shuffle unfold fold", F), Rule(MOVE))
    put(_fns("index_select gather take_along_dim"), Rule(MOVE, names="input dim index"))
    put([operator.getitem], Rule(MOVE, ((0, "a"),), names="tensor index"))
    put([operator.setitem], Rule(MOVE, ((0, "a"), (2, "c")), names="tensor index"))
    put([getattr], Rule(MOVE, ((0, "o"),), check=_getattr_check))
    # padding
    put(_fns("pad", F), Rule(PAD, check=_pad_check))
    # pooling and resampling
    put(_fns("avg_pool1d adaptive_avg_pool1d") + _fns("avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
                                                      "adaptive_avg_pool2d adaptive_avg_pool3d interpolate upsample "
                                                      "upsample_nearest upsample_bilinear grid_sample affine_grid", F)
        + [G.avg_pool_standin], Rule(POOL))
    # reductions
    put(_fns("sum mean cumsum trace diff"), Rule(REDUCE))
    # identity in eval mode
    put(_fns("dropout alpha_dropout feature_alpha_dropout"), Rule(IDENTITY, check=_training_off(2, True)))
    put(_fns("dropout dropout1d dropout2d dropout3d", F), Rule(IDENTITY, check=_training_off(2, True)))
    put(_fns("alpha_dropout feature_alpha_dropout", F), Rule(IDENTITY, check=_training_off(2, False)))
    return rules


def _getattr_check(node: fx.Node) -> str | None:
    attr = node.args[1] if len(node.args) > 1 else None
    return None if attr in ("T", "mT", "H", "mH", "data") else f"of attribute {attr!r}"


def _method_rules() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}

    def put(names: str, rule: Rule) -> None:
        for n in names.split():
            rules[n] = rule

    put("matmul mm bmm mv dot inner outer ger kron __matmul__", Rule(LINEAR, _AB, _AB))
    addmm = ((0, "self"), (1, "mat1"), (2, "mat2"))
    put("addmm addmm_ baddbmm baddbmm_ addbmm addbmm_ addmv addmv_ addr addr_", Rule(LINEAR, addmm, addmm[1:]))
    put("add add_ sub sub_ subtract subtract_ __add__ __radd__ __sub__ __rsub__ __iadd__ __isub__", Rule(ARITH, _AB))
    put("neg neg_ negative negative_ positive __neg__ __pos__", Rule(ARITH, _SELF))
    put("mul mul_ multiply multiply_ __mul__ __rmul__ __imul__", Rule(ARITH, _AB, _AB))
    put("div div_ divide divide_ true_divide true_divide_ __truediv__ __itruediv__",
        Rule(ARITH, _SELF, check=_div_check))
    put("lerp lerp_", Rule(ARITH, ((0, "self"), (1, "end"))))
    put("addcmul addcmul_", Rule(ARITH, ((0, "self"), (1, "tensor1"), (2, "tensor2")), ((1, "tensor1"), (2, "tensor2"))))
    put("addcdiv addcdiv_", Rule(ARITH, ((0, "self"), (1, "tensor1"))))
    put("where", Rule(ARITH, ((0, "self"), (2, "other")), names="self condition"))
    put("masked_fill masked_fill_", Rule(ARITH, _SELF, names="self mask value"))
    put("index_select gather take_along_dim", Rule(MOVE, _SELF, names="self dim index"))
    put("copy_", Rule(MOVE, ((0, "self"), (1, "src"))))
    put("index_add index_add_ index_copy index_copy_", Rule(MOVE, ((0, "self"), (3, "source"))))
    put("scatter scatter_ scatter_add scatter_add_", Rule(MOVE, ((0, "self"), (3, "src"))))
    put("masked_scatter masked_scatter_", Rule(MOVE, ((0, "self"), (2, "source"))))
    put("fill_ zero_", Rule(MOVE, _SELF))
    put("view reshape flatten unflatten squeeze squeeze_ unsqueeze unsqueeze_ permute transpose "
        "transpose_ t t_ swapaxes swapdims movedim moveaxis narrow select roll "
        "flip fliplr flipud rot90 repeat repeat_interleave tile expand broadcast_to diagonal diag_embed "
        "tril tril_ triu triu_ split split_with_sizes chunk tensor_split unbind unfold contiguous clone detach "
        "detach_ requires_grad_ ravel __getitem__", Rule(MOVE, _SELF))
    put("__setitem__", Rule(MOVE, ((0, "self"), (2, "value"))))
    put("to type float double half bfloat16 cpu cuda", Rule(MOVE, _SELF, check=_float_dtype_check))
    # the other tensor gives only its shape / dtype / device
    put("view_as reshape_as expand_as type_as to", Rule(MOVE, ((0, "self"), (1, "other")), check=_float_dtype_check))
    put("sum mean cumsum cumsum_ trace diff", Rule(REDUCE, _SELF))
    return rules


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------

def _bn_check(m: nn.Module) -> str | None:
    if not (m.track_running_stats and m.running_mean is not None and m.running_var is not None):
        return "without running statistics (normalises with batch statistics)"
    return None


@dataclass(frozen=True)
class ModuleRule:
    category: str
    operands: int = 1          # input-dependent operands allowed among the first ``operands`` arguments
    product: bool = False      # at most one of them may depend on the input
    check: Callable[[nn.Module], str | None] | None = None


_MODULE_RULES: dict[type, ModuleRule] = {
    **{t: ModuleRule(LINEAR) for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                       nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Identity)},
    nn.Bilinear: ModuleRule(LINEAR, operands=2, product=True),
    **{t: ModuleRule(NORM, check=_bn_check) for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                                      nn.SyncBatchNorm)},
    **{t: ModuleRule(MOVE) for t in (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
                                     nn.Fold, nn.Unfold)},
    **{getattr(nn, f"{kind}Pad{d}d"): ModuleRule(PAD) for kind in ("Zero", "Reflection", "Replication", "Circular")
       for d in (1, 2, 3) if hasattr(nn, f"{kind}Pad{d}d")},
    **{getattr(nn, f"ConstantPad{d}d"): ModuleRule(PAD, check=lambda m: None if math.isfinite(m.value) else
                                                   f"with the non-finite value {m.value}") for d in (1, 2, 3)},
    **{t: ModuleRule(POOL) for t in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                                     nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample,
                                     nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)},
    **{t: ModuleRule(IDENTITY) for t in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                         nn.FeatureAlphaDropout)},
}


_LIBRARY_RULES: dict[frozenset[str], dict[type, ModuleRule]] = {}


def _library_module_rules() -> dict[type, ModuleRule]:
    """Listed modules of timm and torchvision (only when those libraries are imported)."""
    key = frozenset(n for n in ("timm", "torchvision", "timm.layers.conv2d_same", "timm.layers.pool2d_same",
                                "timm.layers.std_conv") if n in sys.modules)
    if key not in _LIBRARY_RULES:
        _LIBRARY_RULES[key] = _find_library_module_rules()
    return _LIBRARY_RULES[key]


def _find_library_module_rules() -> dict[type, ModuleRule]:
    out: dict[type, ModuleRule] = {}
    if "timm" in sys.modules:
        try:
            from timm.layers import DropBlock2d, DropPath
            out[DropPath] = out[DropBlock2d] = ModuleRule(IDENTITY)
        except Exception:  # pragma: no cover - other timm versions
            pass
        for path, name in (("timm.layers.conv2d_same", "Conv2dSame"), ("timm.layers.pool2d_same", "AvgPool2dSame"),
                           ("timm.layers.std_conv", "StdConv2dSame"), ("timm.layers.std_conv", "ScaledStdConv2dSame")):
            cls = getattr(sys.modules.get(path), name, None)
            if isinstance(cls, type):
                out[cls] = ModuleRule(POOL if "Pool" in name else LINEAR)
    if "torchvision" in sys.modules:
        try:
            from torchvision.ops import StochasticDepth
            out[StochasticDepth] = ModuleRule(IDENTITY)
        except Exception:  # pragma: no cover
            pass
    return out


def module_rule(m: nn.Module) -> ModuleRule | None:
    """The rule for a module call, or ``None`` if the module is not on the list (or overrides ``forward``)."""
    for table in (_MODULE_RULES, _library_module_rules()):
        rule = table.get(type(m))
        if rule is not None:
            return rule
        for cls, rule in table.items():
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return rule
    return None


# --------------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------------

_NAMES: dict[int, str] = {}


def function_name(fn: Callable) -> str:
    """``F.gelu``, ``torch.sigmoid``, ``operator.mul``: how a user would spell the function."""
    if not _NAMES:
        for prefix, namespace in (("operator.", operator), ("F.", F), ("torch.", torch)):
            for k, v in vars(namespace).items():
                if callable(v) and not k.startswith("__"):
                    _NAMES.setdefault(id(v), prefix + k)
        for k, v in vars(F).items():   # functional ops implemented in torch.nn.functional / torch._C._nn
            if callable(v) and getattr(v, "__module__", "") in ("torch.nn.functional", "torch._C._nn"):
                _NAMES[id(v)] = "F." + k
        for k, v in vars(torch).items():
            if callable(v) and getattr(v, "__module__", "") == "torch" and not k.startswith("_"):
                _NAMES[id(v)] = "torch." + k
    name = _NAMES.get(id(fn))
    if name is not None:
        return name
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}".lstrip(".")


def module_name(m: nn.Module) -> str:
    """``nn.LSTM``; ``TorchScript module``/``opaque leaf module`` with the class name for other modules."""
    cls = type(m)
    if isinstance(m, torch.jit.ScriptModule):
        return f"TorchScript module {getattr(m, 'original_name', cls.__name__)} (opaque leaf, not proven affine)"
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    return f"opaque leaf module {cls.__module__}.{cls.__qualname__} (not proven affine)"


def op_name(node: fx.Node, modules: dict[str, Any]) -> str:
    if node.op == "call_module":
        return module_name(modules[node.target])
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return function_name(node.target)
    return f"{node.op} {node.target}"


# --------------------------------------------------------------------------------------------------
# data dependence
# --------------------------------------------------------------------------------------------------

def _shape_only(node: fx.Node) -> bool:
    """A shape query, or a tensor made from a shape only (``zeros_like``)."""
    if is_shape_query(node):
        return True
    if node.op == "call_method":
        return node.target in _SHAPE_ONLY_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_ONLY_FUNCTIONS
    return False


def input_dependence(graph: fx.Graph, modules: dict[str, Any]) -> dict[fx.Node, bool]:
    """Which nodes carry data derived from the graph's inputs. Shape queries and tensors made from shapes do
    not; a tensor that a later op fills with input-dependent data in place does from then on (so do all its
    aliases)."""
    return _propagate(graph, modules, {n for n in graph.nodes if n.op == "placeholder"})


def downstream(graph: fx.Graph, modules: dict[str, Any], sources: set[fx.Node]) -> set[fx.Node]:
    """The nodes whose data depends on the output of one of ``sources`` (themselves included), through uses
    and through in-place writes."""
    dep = _propagate(graph, modules, sources)
    return {n for n, d in dep.items() if d}


def _propagate(graph: fx.Graph, modules: dict[str, Any], sources: set[fx.Node]) -> dict[fx.Node, bool]:
    group, _ = alias_analysis(graph, modules)
    tainted: set[int] = set()
    dep: dict[fx.Node, bool] = {}

    def carries(n: fx.Node) -> bool:
        return dep.get(n, False) or group.get(n) in tainted

    for node in graph.nodes:
        if node in sources:
            dep[node] = True
        elif node.op in ("placeholder", "get_attr", "output") or _shape_only(node):
            dep[node] = False
        else:
            dep[node] = any(carries(n) for n in node.all_input_nodes)
        written = written_input(node, modules)
        if written is not None and dep[node]:
            tainted.add(group[written])
    for node in graph.nodes:  # a tensor read after the write (conservatively: every alias of it)
        if group.get(node) in tainted and node.op != "output" and not is_shape_query(node):
            dep[node] = True
    return dep


# --------------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------------

_FUNCTION_RULES: dict[Callable, Rule] | None = None
_METHOD_RULES = _method_rules()
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
    if not dep.get(node, False) or _shape_only(node):
        return None
    name = op_name(node, modules)
    if node.op == "call_module":
        return _module_violation(node, modules[node.target], dep, name)
    if node.op == "call_function":
        if _FUNCTION_RULES is None:
            _FUNCTION_RULES = _function_rules()
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

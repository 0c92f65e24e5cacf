"""The allow-list for function and ``Tensor`` method calls: a :class:`Rule` per op, by category (see
:mod:`relu2dlgn.affine`)."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import gates as G

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


def function_rules() -> dict[Callable, Rule]:
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


def method_rules() -> dict[str, Rule]:
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

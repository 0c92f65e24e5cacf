"""Edits of the exported ONNX graph: removing outputs (and the nodes only they needed), and the gate forms for
onnxruntime's CPU provider (onnxscript rewrite rules)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["strip_outputs", "onnxruntime_cpu_gates"]


def strip_outputs(model_proto: Any, names: set[str]) -> Callable[[], None]:
    """Remove the graph outputs ``names`` and the nodes only they needed, in place (the weights are not
    copied). Returns a function that puts them back."""
    import onnx

    graph = model_proto.graph
    saved_outputs = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in graph.output]
    saved_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
    keep = [o for o in saved_outputs if o.name not in names]
    del graph.output[:]
    graph.output.extend(keep)
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(saved_nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    if len(live) != len(saved_nodes):
        del graph.node[:]
        graph.node.extend(reversed(live))

    def restore() -> None:
        del graph.output[:]
        graph.output.extend(saved_outputs)
        del graph.node[:]
        graph.node.extend(saved_nodes)

    return restore


# --------------------------------------------------------------------------------------------------
# onnxruntime's CPU provider: gate applications without Where (onnxscript rewrite rules)
# --------------------------------------------------------------------------------------------------
#
# A hard gate is applied as ``Where(gate, v, 0)`` (see relu2dlgn.gates), exact for every float. On onnxruntime's CPU
# provider that form is slow twice over: its Where kernel is ~40x slower than Mul (measured: 1.4 ms against 33 us
# for 64x56x56 floats), and none of LessOrEqual, Not or Where runs in the blocked NCHWc layout of its convolutions,
# so every gate also pays NCHWc <-> NCHW reorders of q, v and the gated value. The rules below rewrite, in a
# float32 graph:
#
# * the ReLU-family gate of a 4-d q, ``Where(Not(LessOrEqual(q, 0)), v, 0)``, into
#   ``Mul(v, HardSigmoid(Conv(q, 2^127 per channel, group=C), alpha=2^127, beta=0))``: onnxruntime fuses the
#   depthwise 1x1 Conv and the HardSigmoid into one NCHWc kernel and runs the Mul in NCHWc too, so the gate costs
#   two passes and no reorder. The mask is ``clip(2^254 q, 0, 1)`` = ``1(q > 0)`` exactly for every q but NaN:
#   the smallest positive float32, 2^-149, scales to 2^105 >= 1, and overflow to +inf still clips to 1;
# * every other float ``Where(c, x, y)`` into ``x * Cast(c) + y * Cast(Not(c))`` (``x * Cast(c)`` for y = 0).
#
# Both are exact for finite values; an infinite value where the gate is off gives NaN (``inf * 0``) where PyTorch
# gives 0, and a NaN pre-activation gives NaN. Float16 graphs keep Where (fp16 overflows readily, and 2^127 is not
# an fp16 number); ``export_onnx(portable=True)`` applies none of this.

_GATE_SCALE = 2.0 ** 127


def _scalar(value: Any) -> float | None:
    from onnxscript import ir

    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(-1)[0])


def _is_float32(value: Any) -> bool:
    from onnxscript import ir

    return value.dtype == ir.DataType.FLOAT


def _relu_gate_target(op: Any, q: Any, zero: Any, v: Any, off: Any) -> Any:
    return op.Where(op.Not(op.LessOrEqual(q, zero)), v, off)


def _relu_gate_condition(context: Any, q: Any, zero: Any, v: Any, off: Any, **_: Any) -> bool:
    """A float32 NCHW q with a known channel count, gated at 0, the value set to 0 where the gate is off."""
    shape = q.shape
    return (_scalar(zero) == 0.0 and _scalar(off) == 0.0 and _is_float32(q) and _is_float32(v)
            and shape is not None and len(shape) == 4 and isinstance(shape[1], int))


def _relu_gate_replacement(op: Any, q: Any, v: Any, **_: Any) -> Any:
    from onnxscript import ir

    channels = q.shape[1]
    scale = op.Constant(value=ir.tensor(np.full((channels, 1, 1, 1), _GATE_SCALE, dtype=np.float32)))
    mask = op.HardSigmoid(op.Conv(q, scale, group=channels), alpha=_GATE_SCALE, beta=0.0)
    return op.Mul(v, mask)


def _where_target(op: Any, cond: Any, x: Any, y: Any) -> Any:
    return op.Where(cond, x, y)


def _where_condition(context: Any, cond: Any, x: Any, y: Any, **_: Any) -> bool:
    return _is_float32(x) and _is_float32(y)


def _where_replacement(op: Any, cond: Any, x: Any, y: Any) -> Any:
    from onnxscript import ir

    on = op.Mul(x, op.Cast(cond, to=ir.DataType.FLOAT))
    if _scalar(y) == 0.0:
        return on
    return op.Add(on, op.Mul(y, op.Cast(op.Not(cond), to=ir.DataType.FLOAT)))


def onnxruntime_cpu_gates(model: Any) -> tuple[int, int]:
    """Rewrite the gate applications of a float32 ``onnx_ir`` model for onnxruntime's CPU provider, in place (see
    the comment above). Returns how many ReLU-family gates became NCHWc masks and how many Where nodes
    arithmetic."""
    from onnxscript.rewriter import pattern

    relu = pattern.RewriteRule(_relu_gate_target, _relu_gate_replacement, _relu_gate_condition, remove_nodes=False,
                               name="relu_gate_nchwc")
    where = pattern.RewriteRule(_where_target, _where_replacement, _where_condition, name="where_arithmetic")
    masks = pattern.RewriteRuleSet([relu]).apply_to_model(model)
    selects = pattern.RewriteRuleSet([where]).apply_to_model(model)
    return masks, selects


def _subgraph_inputs(node: Any) -> set[str]:
    import onnx

    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


"""Edits of the exported ONNX graph: removing outputs (and the nodes only they needed), and the cheaper
per-plane max-pool index offsets."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["strip_outputs", "cheap_pool_offsets"]


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
# cheaper per-plane max-pool indices: an onnxscript rewrite rule
# --------------------------------------------------------------------------------------------------
#
# torchlib turns ONNX's MaxPool indices (flat over the whole tensor) into PyTorch's per-plane ones by running a
# second MaxPool (kernel 1, with indices) over the whole input and slicing out the offset of each plane:
#
#     _, indices = MaxPool(x, kernel_shape=[1, ...])       # its values output unused
#     offsets = Slice(indices, starts=[0, ...], ends=[1, ...], axes=[2, ...])
#
# That pass is a quarter to a third of a max-pool gate's time in onnxruntime. The rule below replaces it by the
# offsets' arithmetic, ``(n * C + c) * prod(spatial)`` shaped [N, C, 1, ...]. The matcher only replaces nodes whose
# other outputs are unused (the kernel-1 MaxPool's values, and its indices outside the Slice), which is the
# condition under which the MaxPool may go.

def _pool_offsets_target(op: Any, x: Any, starts: Any, ends: Any, axes: Any) -> Any:
    _, indices = op.MaxPool(x, _outputs=2)
    return op.Slice(indices, starts, ends, axes, _allow_other_inputs=True, _outputs=["offsets"])


def _ints(value: Any) -> list[int] | None:
    from onnxscript import ir

    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _pool_offsets_condition(context: Any, x: Any, starts: Any, ends: Any, axes: Any, offsets: Any, **_: Any) -> bool:
    """The MaxPool has kernel, strides 1 and no padding; the Slice takes element 0 of every spatial axis."""
    if context.model.opset_imports.get("", 0) < 18:
        return False
    slice_node = offsets.producer()
    attrs = slice_node.inputs[0].producer().attributes
    kernel = list(attrs.get_ints("kernel_shape", ()))
    nd = len(kernel)
    if not nd or kernel != [1] * nd or list(attrs.get_ints("strides", [1] * nd)) != [1] * nd or \
            any(attrs.get_ints("pads", [0] * 2 * nd)) or attrs.get_int("storage_order", 0) != 0:
        return False
    steps = slice_node.inputs[4] if len(slice_node.inputs) > 4 else None
    steps_ints = _ints(steps) if steps is not None else [1] * nd
    starts_ints, ends_ints, axes_ints = _ints(starts), _ints(ends), _ints(axes)
    if None in (starts_ints, ends_ints, axes_ints, steps_ints):
        return False
    return sorted(a % (nd + 2) for a in axes_ints) == list(range(2, nd + 2)) and starts_ints == [0] * nd and \
        ends_ints == [1] * nd and steps_ints == [1] * nd


def _pool_offsets_replacement(op: Any, x: Any, axes: Any, **_: Any) -> Any:
    from onnxscript import ir

    def int64(values: Any) -> Any:
        return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))

    nc = op.Shape(x, start=0, end=2)
    plane = op.ReduceProd(op.Shape(x, start=2), keepdims=0)
    planes = op.ReduceProd(nc, keepdims=0)
    flat = op.Mul(op.Range(int64(0), planes, int64(1)), plane)
    return op.Reshape(flat, op.Concat(nc, int64([1] * len(_ints(axes))), axis=0))


def cheap_pool_offsets(model: Any) -> int:
    """Replace torchlib's per-plane index offsets of max-pool gates (a second, kernel-1 MaxPool) by arithmetic,
    in place in an ``onnx_ir`` model (opset >= 18). Returns how many were replaced."""
    from onnxscript.ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter import pattern

    rule = pattern.RewriteRule(_pool_offsets_target, _pool_offsets_replacement, _pool_offsets_condition)
    count = pattern.RewriteRuleSet([rule]).apply_to_model(model)
    if count:
        RemoveUnusedNodesPass()(model)  # the Slice's constant starts / ends / axes
    return count


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


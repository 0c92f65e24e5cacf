"""Edits of the exported ONNX graph: removing outputs (and the nodes only they needed), and the cheaper
per-plane max-pool index offsets."""
from __future__ import annotations

import collections
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


def cheap_pool_offsets(model_proto: Any) -> int:
    """Make max-pool gates cheaper: torchlib turns ONNX's MaxPool indices (flat over the whole tensor) into
    PyTorch's per-plane ones by running a second MaxPool (kernel 1, with indices) over the whole input and
    slicing out the offset of each plane. Replace that pass (a quarter to a third of a max-pool gate's time in
    onnxruntime) by the offsets' arithmetic: ``(n * C + c) * prod(spatial)``. Returns how many were replaced."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    opset = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        return 0
    consumers: dict[str, list] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    graph_outputs = {o.name for o in graph.output}

    replaced = 0
    new_nodes = []
    dropped: set[str] = set()  # outputs of the Slice nodes replaced
    orphans: set[str] = set()  # their constant inputs
    for node in graph.node:
        if node.op_type == "Slice" and node.output[0] in dropped:
            continue
        pattern = _offset_pattern(node, consumers, constants, graph_outputs)
        if pattern is None:
            new_nodes.append(onnx.NodeProto.FromString(node.SerializeToString()))
            continue
        slice_node, nd = pattern
        x, delta, tag = node.input[0], slice_node.output[0], f"{slice_node.output[0]}__r2d"

        def const(name: str, values: list[int], scalar: bool = False) -> Any:
            array = np.array(values[0] if scalar else values, dtype=np.int64)
            return helper.make_node("Constant", [], [f"{tag}_{name}"], value=numpy_helper.from_array(array))

        new_nodes += [
            const("zero", [0], scalar=True), const("one", [1], scalar=True), const("ones", [1] * nd),
            helper.make_node("Shape", [x], [f"{tag}_nc"], start=0, end=2),
            helper.make_node("Shape", [x], [f"{tag}_spatial"], start=2),
            helper.make_node("ReduceProd", [f"{tag}_nc"], [f"{tag}_planes"], keepdims=0),
            helper.make_node("ReduceProd", [f"{tag}_spatial"], [f"{tag}_plane"], keepdims=0),
            helper.make_node("Range", [f"{tag}_zero", f"{tag}_planes", f"{tag}_one"], [f"{tag}_range"]),
            helper.make_node("Mul", [f"{tag}_range", f"{tag}_plane"], [f"{tag}_flat"]),
            helper.make_node("Concat", [f"{tag}_nc", f"{tag}_ones"], [f"{tag}_shape"], axis=0),
            helper.make_node("Reshape", [f"{tag}_flat", f"{tag}_shape"], [delta]),
        ]
        dropped.add(delta)
        orphans.update(slice_node.input[1:])
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(new_nodes)
        orphans -= {name for n in graph.node for name in n.input}
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name in orphans:
                del graph.initializer[i]
    return replaced


def _offset_pattern(node: Any, consumers: dict, constants: dict, graph_outputs: set) -> tuple[Any, int] | None:
    """``(slice_node, spatial rank)`` if ``node`` is torchlib's kernel-1 MaxPool feeding only a Slice that takes
    the first element of every spatial axis (the per-plane offsets), else ``None``."""
    from onnx import helper

    if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len(node.output) != 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    nd = len(kernel)
    if not kernel or kernel != [1] * nd or list(attrs.get("strides", [1] * nd)) != [1] * nd or \
            any(attrs.get("pads", [0] * 2 * nd)) or attrs.get("storage_order", 0) != 0:
        return None
    if node.output[0] and (consumers.get(node.output[0]) or node.output[0] in graph_outputs):
        return None
    users = consumers.get(node.output[1], [])
    if len(users) != 1 or users[0].op_type != "Slice" or node.output[1] in graph_outputs:
        return None
    slice_node = users[0]
    ins = list(slice_node.input) + [""] * (5 - len(slice_node.input))
    starts, ends, axes = (constants.get(n) if n else None for n in ins[1:4])
    if starts is None or ends is None or axes is None or (ins[4] and constants.get(ins[4]) is None):
        return None
    steps = constants.get(ins[4]) if ins[4] else np.ones(nd, dtype=np.int64)
    axes = [int(a) % (nd + 2) for a in axes]
    if sorted(axes) != list(range(2, nd + 2)) or list(starts) != [0] * nd or list(ends) != [1] * nd or \
            list(steps) != [1] * nd:
        return None
    return slice_node, nd


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


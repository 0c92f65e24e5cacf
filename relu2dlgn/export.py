"""ONNX export of a converted model: ``relu2dlgn.export_onnx(dlgn, "model.onnx", example_inputs=(x,))``.

The eval-mode (hard-gate) DLGN/DGN is exported as **one** ONNX graph ``inputs -> outputs``: the gating graph,
the gates and the value graph all inside it. Gates lower to cheap, exact ONNX ops:

==========================  =========================================================================
gate kind                   ONNX
==========================  =========================================================================
relu / leaky_relu / prelu   ``Greater(q, 0) -> Cast(float)``; the value net multiplies by the mask
hardtanh / relu6            two such masks (``q > lo``, ``q > hi``) stacked on a new leading axis
maxpool                     ``MaxPool`` with its ``Indices`` output (made per-plane, as PyTorch's are);
                            the value net reads its own tensor there with ``GatherElements``
==========================  =========================================================================

Comparisons and casts of 0/1 are exact, so the ONNX gates are those of PyTorch except where the two
backends' pre-activations straddle a tie (``q`` within rounding of 0 / lo / hi, or two window elements
within rounding of each other). See :func:`export_onnx` for how verification accounts for that.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import linecache
import math
import os
import re
import shutil
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .dlgn import DLGN
from .errors import ExportError
from .gates import make_gate

__all__ = ["export_onnx", "ExportReport", "OnnxFile", "Verification", "SiteAgreement", "split_paths"]

DEFAULT_RTOL = 1e-4
DEFAULT_GATE_TOL = 1e-4
_PROVIDER = "CPUExecutionProvider"


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

@dataclass
class OnnxFile:
    """One written ONNX file."""

    path: str
    size: int
    opset: int
    inputs: list[str]
    outputs: list[str]
    ops: dict[str, int]


@dataclass
class SiteAgreement:
    """How the onnxruntime gates of one site compare with PyTorch's on the verification batch."""

    index: int
    kind: str
    module_path: str
    total: int
    flipped: int
    worst_tie: float  # max over flipped gates of the tie gap / max|q| of the site (0 if none flipped)


@dataclass
class Verification:
    """Figures of onnxruntime vs PyTorch on a fresh batch (see :func:`export_onnx`)."""

    batch: int
    provider: str
    rtol: float
    gate_tol: float
    scale: float          # max |PyTorch output|
    max_abs: float        # end to end: onnxruntime vs dlgn(x)
    p99_abs: float
    beyond_tol: float     # fraction of output elements with |err| > rtol * scale
    value_max_abs: float | None  # onnxruntime output vs PyTorch's value network fed onnxruntime's gates
    value_scale: float
    sites: list[SiteAgreement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def gates_total(self) -> int:
        return sum(s.total for s in self.sites)

    @property
    def gates_flipped(self) -> int:
        return sum(s.flipped for s in self.sites)

    @property
    def worst_tie(self) -> float:
        return max((s.worst_tie for s in self.sites), default=0.0)

    def __str__(self) -> str:
        rel = lambda v, s: f"{v:.3g} ({v / s:.2g} of max|y|)" if s > 0 else f"{v:.3g}"  # noqa: E731
        lines = [
            f"verified with onnxruntime ({self.provider}) on a fresh batch of {self.batch}: "
            + ("OK" if self.ok else "FAILED"),
            f"  output vs PyTorch          max |err| {rel(self.max_abs, self.scale)}, "
            f"p99 |err| {rel(self.p99_abs, self.scale)}, beyond {self.rtol:g}*max|y|: {self.beyond_tol:.3%}",
        ]
        if self.value_max_abs is not None:
            lines.append(f"  value net at ORT's gates   max |err| {rel(self.value_max_abs, self.value_scale)} "
                         f"(limit {self.rtol:g} of max|y|)")
        if not self.sites:
            lines.append("  gates                      not compared: the output is within tolerance")
        else:
            flips = f"  gates                      {self.gates_flipped} of {self.gates_total} differ"
            if self.gates_flipped:
                flips += (f", {'all' if self.worst_tie <= self.gate_tol else 'NOT all'} at ties (worst gap "
                          f"{self.worst_tie:.2g} of max|q|, limit {self.gate_tol:g})")
            lines.append(flips)
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well it reproduces PyTorch. ``print(report)`` shows it all."""

    files: list[OnnxFile]
    mode: str
    value_input: str
    pool: str
    num_sites: int
    dynamic_batch: bool
    example_shapes: list[tuple[int, ...]]
    gates_output: bool
    split: bool
    exporter: str
    seconds: float
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The fused file, or the gating file of a split export."""
        return self.files[0].path

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def opset(self) -> int:
        return self.files[0].opset

    @property
    def max_abs_error(self) -> float | None:
        return self.verification.max_abs if self.verification else None

    @property
    def p99_abs_error(self) -> float | None:
        return self.verification.p99_abs if self.verification else None

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.example_shapes)
        steps = ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items())
        lines = [f"relu2dlgn ONNX export ({self.exporter}, {self.seconds:.1f} s{': ' + steps if steps else ''}): "
                 f"mode={self.mode} "
                 f"value_input={self.value_input} pool={self.pool}, {self.num_sites} gate sites, "
                 f"traced at {shapes}, batch axis {'dynamic' if self.dynamic_batch else 'static'}"]
        for f in self.files:
            ops = ", ".join(f"{k} {v}" for k, v in sorted(f.ops.items(), key=lambda kv: (-kv[1], kv[0])))
            lines += [f"{f.path}: {_human(f.size)}, opset {f.opset}, {sum(f.ops.values())} nodes",
                      f"  inputs:  {', '.join(f.inputs)}",
                      f"  outputs: {_short_list(f.outputs)}",
                      f"  ops:     {ops}"]
        lines.append(str(self.verification) if self.verification else "not verified (verify=False)")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _short_list(names: Sequence[str], keep: int = 8) -> str:
    if len(names) <= keep:
        return ", ".join(names)
    return ", ".join(names[:keep - 2]) + f", ... ({len(names)} in all), " + names[-1]


# --------------------------------------------------------------------------------------------------
# the modules that are exported
# --------------------------------------------------------------------------------------------------

class _ExportModule(nn.Module):
    """``part="fused"``: inputs -> (*outputs, *gates?); ``"gating"``: inputs -> gates;
    ``"value"``: (*inputs, *gates) -> outputs. Hard gates (eval mode) only."""

    def __init__(self, dlgn: DLGN, part: str, gates_output: bool = False):
        super().__init__()
        self.part = part
        self.gates_output = gates_output
        self.num_inputs = len(dlgn.input_specs)
        if part in ("fused", "gating"):
            self.gating = dlgn.gating
        if part in ("fused", "value"):
            self.value = dlgn.value
        self._specs = list(dlgn.gate_specs)
        self._beta = dlgn.beta
        self._value_inputs = dlgn.value_inputs  # a bound method: not registered as a submodule

    def _gates(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        qs = self.gating(*inputs)
        return tuple(make_gate(spec, q, self._beta, True) for spec, q in zip(self._specs, qs))

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.part == "gating":
            return self._gates(args)
        if self.part == "value":
            inputs, gates = args[:self.num_inputs], args[self.num_inputs:]
        else:
            inputs = args
            gates = self._gates(inputs)
        outputs = tuple(pytree.tree_leaves(self.value(*self._value_inputs(*inputs), *gates)))
        if self.part == "fused" and self.gates_output:
            return outputs + gates
        return outputs


# The exporter: torch.onnx's torch.export-based ("dynamo") exporter with onnxscript, fed an ExportedProgram that
# we make ourselves with torch.export.export(strict=False). Both exporters reproduce these graphs; we chose
# this one because the TorchScript exporter is deprecated since torch 2.9 (a DeprecationWarning on every call,
# opsets up to 20 only), jit.trace records one shape and re-derives the batch size through Shape/Gather/
# Concat chains (21 Constant + 17 Shape/Gather/Unsqueeze/Concat nodes in a 3-conv test net, none with this
# exporter, which also runs onnxscript's optimizer: constant folding, deduplication), whereas torch.export
# proves the batch axis symbolic: a model that bakes in the batch size is refused instead of silently
# exported. Its cost, measured on the 2-core dev VM (torch.export + translation + onnxscript's optimizer):
# ~2.5 s resnet18, ~6 s resnet50, ~20 s densenet121, against ~6.5 s for TorchScript on the latter two:
# affordable. We call torch.export ourselves rather than let torch.onnx.export do it because torch.onnx falls
# back to other capture strategies when torch.export fails (a numpy round trip then becomes a baked-in
# constant), and because the exception then carries a traceback we can map back to the DLGN's fx node.
EXPORTER = "torch.export + torch.onnx (onnxscript)"


def _output_names(example_out: Any) -> list[str]:
    leaves = pytree.tree_flatten_with_path(example_out)[0]
    if len(leaves) == 1:
        return ["output"]
    names = []
    for i, (keypath, _) in enumerate(leaves):
        parts = []
        for k in keypath:
            key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", i)))
            parts.append(re.sub(r"\W+", "_", str(key)).strip("_"))
        names.append("_".join(["output", *parts]) if parts else f"output_{i}")
    return names


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        out.append(n)
    return out


# --------------------------------------------------------------------------------------------------
# torch.export + ONNX translation, with errors mapped back to the DLGN's fx nodes
# --------------------------------------------------------------------------------------------------

_EVAL_KEY = re.compile(r'File "(<eval_with_key>\.\d+)", line (\d+)')


def _graph_files(dlgn: DLGN) -> dict[str, tuple[str, fx.GraphModule]]:
    out = {}
    for name in ("gating", "value"):
        gm = getattr(dlgn, name)
        out[type(gm).forward.__code__.co_filename] = (name, gm)
    return out


def _fx_node_at(files: dict[str, tuple[str, fx.GraphModule]], filename: str, lineno: int) -> str | None:
    if filename not in files:
        return None
    graph_name, gm = files[filename]
    m = re.match(r"\s*(\w+)\s*=", linecache.getline(filename, lineno))
    node = next((n for n in gm.graph.nodes if m and n.name == m.group(1)), None)
    if node is None:
        return None
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and hasattr(node.target, "_schema"):
        target = str(node.target)
    return (f"node '{node.name}' of the {graph_name} graph ({node.op} {target}, module "
            f"'{node.meta.get('module_path', '') or '<root>'}')")


def _locate_in_traceback(exc: BaseException, files: dict[str, tuple[str, fx.GraphModule]]) -> str | None:
    found = None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for fs in traceback.extract_tb(exc.__traceback__):
            found = _fx_node_at(files, fs.filename, fs.lineno) or found
        exc = exc.__cause__ or exc.__context__
    return found


def _locate_in_stack_trace(stack_trace: str, files: dict[str, tuple[str, fx.GraphModule]]) -> str | None:
    found = None
    for filename, lineno in _EVAL_KEY.findall(stack_trace or ""):
        found = _fx_node_at(files, filename, int(lineno)) or found
    return found


def _root_message(exc: BaseException) -> str:
    """The innermost two causes' first lines (torch's outer messages are long boilerplate)."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__
    msgs = []
    for e in reversed(chain[-2:] if len(chain) > 1 else chain):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        msgs.append(f"{type(e).__name__}: {text.splitlines()[0].rstrip('.') if text else ''}")
    return " <- ".join(msgs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress lines and warns about things we handle; keep stdout clean."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield


def _export_part(module: _ExportModule, args: tuple, dynamic_shapes: tuple | None, input_names: list[str],
                 output_names: list[str], *, what: str, opset: int | None, custom_translations: dict | None,
                 files: dict[str, tuple[str, fx.GraphModule]], timings: dict[str, float]) -> tuple[Any, Any]:
    """torch.export the module, then translate the ExportedProgram to an ONNX ModelProto."""
    tick = time.perf_counter()
    try:
        with _quiet():
            ep = torch.export.export(module, args, strict=False,
                                    dynamic_shapes=None if dynamic_shapes is None else (dynamic_shapes,))
    except Exception as exc:
        text = str(exc)
        where = _locate_in_traceback(exc, files)
        if dynamic_shapes is not None and ("batch" in text and ("Constraints violated" in text
                                                                or "specializ" in text or "specialis" in text)):
            raise ExportError(
                f"cannot export the {what} with a dynamic batch axis: the model's code specialises on the batch "
                f"size{' at ' + where if where else ''} ({_root_message(exc)}). Export with dynamic_batch=False "
                f"(the ONNX model then takes batches of exactly {args[0].shape[0]})") from exc
        raise ExportError(
            f"torch.export cannot capture the {what}"
            + (f": it fails at {where}" if where else "") + f": {_root_message(exc)}. Ops that run Python "
            f"on tensor data (numpy round trips, .item(), data-dependent branches) cannot be exported; a model "
            f"converted with strict=False keeps such ops (see dlgn.report).") from exc
    timings["torch.export"] = timings.get("torch.export", 0.0) + time.perf_counter() - tick
    tick = time.perf_counter()
    try:
        with _quiet():
            program = torch.onnx.export(ep, (), None, dynamo=True, input_names=input_names,
                                        output_names=output_names, opset_version=opset,
                                        custom_translation_table=custom_translations, optimize=True,
                                        verbose=False)
    except Exception as exc:
        text = "\n".join(str(e) for e in _chain(exc))
        m = re.search(r"Error when translating node %(\w+)", text)
        node = next((n for n in ep.graph.nodes if m and n.name == m.group(1)), None)
        where = _locate_in_stack_trace(node.meta.get("stack_trace", ""), files) if node is not None else None
        op = str(node.target) if node is not None else None
        m_op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
        if m_op:
            op = f"{m_op.group(1)}.{m_op.group(2)}"
        if m_op:
            raise ExportError(
                f"no ONNX lowering for op {op}" + (f" at {where}" if where else "")
                + f" in the {what}; a model converted with strict=False keeps ops that are not gates (see "
                f"dlgn.report). Register a translation with export_onnx(..., custom_translations={{"
                f"torch.ops.{op}: onnxscript_function}}) or replace the op. ({_root_message(exc)})") from exc
        at = f" at op {op}" + (f", {where}" if where else "") if op else ""
        raise ExportError(f"ONNX translation of the {what} failed{at}: {_root_message(exc)}") from exc
    proto = program.model_proto
    _cheap_pool_offsets(proto)
    timings["onnx"] = timings.get("onnx", 0.0) + time.perf_counter() - tick
    return ep, proto


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _batch_axes(ep: Any) -> list[int | None]:
    """For each output of an ExportedProgram, the axis whose size is symbolic (the batch axis), if any."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    axes: list[int | None] = []
    for arg in out_node.args[0]:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        shape = getattr(val, "shape", ())
        axes.append(next((i for i, s in enumerate(shape) if isinstance(s, torch.SymInt)), None))
    return axes


# --------------------------------------------------------------------------------------------------
# ONNX model editing and files
# --------------------------------------------------------------------------------------------------

def _strip_outputs(model_proto: Any, names: set[str]) -> Callable[[], None]:
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


def _cheap_pool_offsets(model_proto: Any) -> int:
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


def _add_metadata(model_proto: Any, dlgn: DLGN, part: str) -> None:
    from ._version import __version__

    meta = {"relu2dlgn.version": __version__, "relu2dlgn.part": part, "relu2dlgn.mode": dlgn.mode,
            "relu2dlgn.value_input": dlgn.value_input, "relu2dlgn.pool": dlgn.pool,
            "relu2dlgn.gate_kinds": ",".join(s.kind for s in dlgn.sites)}
    for k, v in meta.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, v
    model_proto.producer_name = "relu2dlgn"
    model_proto.producer_version = __version__


_TWO_GIB = 2**31 - 2**20


def _save(model_proto: Any, path: str) -> None:
    """Write ``model_proto``; over 2 GiB its weights go to ``path + ".data"`` (this moves them out of the proto,
    which then refers to that file)."""
    import onnx

    if model_proto.ByteSize() > _TWO_GIB:
        onnx.save_model(model_proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data")
    else:
        onnx.save_model(model_proto, path)


def _files_of(path: str) -> list[str]:
    data = path + ".data"
    return [data, path] if os.path.exists(data) else [path]


def _describe(model: Any, staged: str, final_path: str) -> OnnxFile:
    ops: collections.Counter = collections.Counter()
    for node in model.graph.node:
        ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    for fn in model.functions:
        for node in fn.node:
            ops[node.op_type] += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    size = sum(os.path.getsize(p) for p in _files_of(staged))
    initialisers = {i.name for i in model.graph.initializer}
    return OnnxFile(final_path, size, opset, [i.name for i in model.graph.input if i.name not in initialisers],
                    [o.name for o in model.graph.output], dict(ops))


def _runnable(model: Any, beside: str) -> str | bytes:
    """What onnxruntime can load ``model`` from: its bytes, or, once its weights live in an external data
    file (over 2 GiB: ``_save`` moved them there), a file ``beside`` in that file's directory."""
    from onnx.external_data_helper import uses_external_data

    if model.ByteSize() > _TWO_GIB or any(uses_external_data(t) for t in model.graph.initializer):
        _save(model, beside)
        return beside
    return model.SerializeToString()


class _Staging:
    """A temporary directory next to the targets; files are written and verified there, then each is moved
    into place with ``os.replace`` (atomic on one filesystem). On error nothing reaches the targets."""

    def __init__(self, targets: list[str]):
        self.targets = [os.path.abspath(t) for t in targets]
        parent = os.path.dirname(self.targets[0])
        for t in self.targets:
            if os.path.isdir(t):
                raise ExportError(f"cannot write '{t}': it is a directory")
        if not os.path.isdir(parent):
            raise ExportError(f"cannot write '{self.targets[0]}': directory '{parent}' does not exist")
        try:
            self.dir = tempfile.mkdtemp(prefix=f".{os.path.basename(self.targets[0])}.tmp-", dir=parent)
        except OSError as exc:
            raise ExportError(f"cannot write '{self.targets[0]}': {exc.strerror or exc} (nothing was written)") \
                from exc

    def path(self, target: str) -> str:
        return os.path.join(self.dir, os.path.basename(target))

    def extra(self, name: str) -> str:
        """A file in the staging directory that is not committed."""
        return os.path.join(self.dir, name)

    def commit(self) -> None:
        for target in self.targets:
            staged = self.path(target)
            for src in _files_of(staged):  # external data first, so the model never points at a missing file
                os.replace(src, os.path.join(os.path.dirname(target), os.path.basename(src)))

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def split_paths(path: str | os.PathLike) -> tuple[str, str]:
    """The two files of ``export_onnx(..., split=True)``: ``X.gating.onnx`` and ``X.value.onnx`` for ``path``
    ``X.onnx`` (or ``X``)."""
    path = os.fspath(path)
    stem = path[:-5] if path.endswith(".onnx") else path
    return f"{stem}.gating.onnx", f"{stem}.value.onnx"


# --------------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------------

def _fresh_batch(examples: Sequence[torch.Tensor], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """New inputs with ``batch`` rows: Gaussian with each example's mean and std (floating point), or the
    example's rows cycled (integer inputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ex in examples:
        if ex.is_floating_point():
            std = ex.float().std().item() if ex.numel() > 1 else 1.0
            x = torch.randn((batch, *ex.shape[1:]), generator=g) * (std if std > 0 else 1.0) + ex.float().mean()
            out.append(x.to(ex.dtype))
        else:
            idx = torch.arange(batch) % ex.shape[0]
            out.append(ex[idx].clone())
    return tuple(out)


def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=[_PROVIDER])


def _run_onnx(session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an onnxruntime session (a seam for tests)."""
    return session.run(None, feeds)


def _feeds_for(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _tie_gaps(spec: Any, q: torch.Tensor, g_ref: torch.Tensor, g_onnx: torch.Tensor) -> tuple[int, float]:
    """Number of gates that differ, and the largest 'distance from a tie' among them, relative to max|q|."""
    scale = q.abs().max().item() if q.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    if spec.kind == "maxpool":
        flat = q.flatten(2)
        n_pos = flat.shape[2]
        i_ref, i_onnx = g_ref.flatten(2), g_onnx.flatten(2)
        if (i_onnx < 0).any() or (i_onnx >= n_pos).any():
            return int((i_ref != i_onnx).sum()), math.inf
        diff = i_ref != i_onnx
        gap = (flat.gather(2, i_ref) - flat.gather(2, i_onnx)).abs()
    elif spec.kind == "hardtanh":
        diff = g_ref != g_onnx
        gap = torch.stack([(q - spec.lo).abs(), (q - spec.hi).abs()])
    else:
        diff = g_ref != g_onnx
        gap = q.abs()
    flipped = int(diff.sum())
    worst = gap[diff].max().item() / scale if flipped else 0.0
    return flipped, worst


def _output_errors(outs: list[np.ndarray], refs: list[torch.Tensor], rtol: float
                   ) -> tuple[list[str], float, float, float, float]:
    """Problems (shape, non-finite, max |err| > rtol * max|ref|) and max |err|, p99 |err|, fraction of elements
    beyond the tolerance, max |ref| of onnxruntime's outputs against reference tensors."""
    problems: list[str] = []
    if len(outs) != len(refs):
        problems.append(f"onnxruntime gives {len(outs)} outputs, PyTorch {len(refs)}")
    errs, beyond, scale = [], [], 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        r = r.float().numpy()
        if o.shape != r.shape:
            problems.append(f"output {i}: onnxruntime shape {o.shape}, PyTorch {r.shape}")
            continue
        e = np.abs(o.astype(np.float32) - r)
        s = float(np.abs(r).max()) if r.size else 0.0
        worst = float(e.max()) if e.size else 0.0
        if not np.isfinite(worst) or worst > rtol * s:
            problems.append(f"output {i}: max |err| {worst:.3g} > {rtol:g} * max|y| ({s:.3g})")
        errs.append(e.ravel())
        beyond.append((e > rtol * s).ravel())
        scale = max(scale, s)
    flat = np.concatenate(errs) if errs else np.zeros(0)
    if not flat.size:
        return problems, 0.0, 0.0, 0.0, scale
    return (problems, float(flat.max()), float(np.percentile(flat, 99)), float(np.concatenate(beyond).mean()),
            scale)


def _verify(dlgn: DLGN, run: Callable[[dict], tuple[list, list | None]],
            run_with_gates: Callable[[dict], tuple[list, list]] | None, input_names: list[str],
            examples: tuple[torch.Tensor, ...], batch: int, seed: int, rtol: float, gate_tol: float
            ) -> Verification:
    """Compare onnxruntime with PyTorch on a fresh batch (the criteria are in :func:`export_onnx`).

    ``run(feeds)`` runs the written file(s): outputs, and the gates when the files expose them.
    ``run_with_gates(feeds)`` runs the same graph with the gates as extra outputs; it is only needed (and
    only called) when the written file hides its gates and its output is not within tolerance."""
    xs = _fresh_batch(examples, batch, seed)
    feeds = {n: x.numpy() for n, x in zip(input_names, xs)}
    outs, g_np = run(feeds)
    with torch.no_grad():
        qs = tuple(dlgn.gating(*(x.clone() for x in xs)))
        g_ref = [make_gate(s.spec, q, dlgn.beta, True) for s, q in zip(dlgn.sites, qs)]
        ref = pytree.tree_leaves(dlgn.value(*dlgn.value_inputs(*(x.clone() for x in xs)), *g_ref))
    e2e_problems, max_abs, p99, beyond, scale = _output_errors(outs, ref, rtol)
    figures = dict(batch=batch, provider=_PROVIDER, rtol=rtol, gate_tol=gate_tol, scale=scale, max_abs=max_abs,
                   p99_abs=p99, beyond_tol=beyond)
    problems: list[str] = []
    if g_np is None:
        if not e2e_problems or run_with_gates is None:
            return Verification(**figures, value_max_abs=None, value_scale=scale, problems=e2e_problems)
        outs_g, g_np = run_with_gates(feeds)
        for i, (a, b) in enumerate(zip(outs, outs_g)):
            if a.shape != b.shape or not np.array_equal(a, b):
                problems.append(f"output {i} of the written file differs from the same graph with gate outputs")

    g_onnx = [torch.from_numpy(np.ascontiguousarray(g)) for g in g_np]
    sites = []
    usable = len(g_onnx) == len(g_ref)
    if not usable:
        problems.append(f"onnxruntime gives {len(g_onnx)} gates, PyTorch {len(g_ref)}")
    for site, q, gr, go in zip(dlgn.sites, qs, g_ref, g_onnx):
        where = f"gate {site.index} ({site.kind} at '{site.module_path or '<root>'}')"
        if go.shape != gr.shape or go.dtype != gr.dtype:
            problems.append(f"{where}: onnxruntime gives {go.dtype} {tuple(go.shape)}, PyTorch {gr.dtype} "
                            f"{tuple(gr.shape)}")
            sites.append(SiteAgreement(site.index, site.kind, site.module_path, gr.numel(), gr.numel(), math.inf))
            usable = False
            continue
        flipped, worst = _tie_gaps(site.spec, q, gr, go)
        sites.append(SiteAgreement(site.index, site.kind, site.module_path, gr.numel(), flipped, worst))
        if worst > gate_tol:
            problems.append(f"{where}: {flipped} of {gr.numel()} gates differ from PyTorch, some away from a tie "
                            f"(gap {worst:.3g} of max|q| > {gate_tol:g}): the gating graph does not compute "
                            f"PyTorch's pre-activations")
            usable = usable and math.isfinite(worst)
    value_err = None
    value_scale = scale
    if usable:
        with torch.no_grad():
            cond = pytree.tree_leaves(dlgn.value(*dlgn.value_inputs(*(x.clone() for x in xs)), *g_onnx))
        value_problems, value_err, _, _, value_scale = _output_errors(outs, cond, rtol)
        problems += [f"{p} (against PyTorch's value network fed onnxruntime's gates)" for p in value_problems]
    else:
        problems += e2e_problems
    return Verification(**figures, value_max_abs=value_err, value_scale=value_scale, sites=sites,
                        problems=problems)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, t in flags.items():
            m.training = t


def _check_ceil_mode(dlgn: DLGN, examples: tuple) -> None:
    """Refuse max-pool sites whose ``ceil_mode`` window count PyTorch and ONNX compute differently.

    PyTorch drops a last window that would start in the right padding (``(out - 1) * stride >= size +
    padding``); ONNX's ``MaxPool``/``AveragePool`` keep it, so the exported shapes would not match."""
    sites = [s for s in dlgn.sites if s.kind == "maxpool" and s.params["ceil_mode"]]
    if not sites:
        return
    with _eval_mode(dlgn), torch.no_grad():
        qs = dlgn.pre_activations(*examples)
    for site in sites:
        geo = site.spec.pool
        for size, k, st, p, d in zip(qs[site.index].shape[2:], geo.kernel_size, geo.stride, geo.padding,
                                     geo.dilation):
            out = -(-(size + 2 * p - d * (k - 1) - 1) // st) + 1
            if (out - 1) * st >= size + p:
                raise ExportError(
                    f"max-pool site {site.index} ({site.op} at module '{site.module_path or '<root>'}'): "
                    f"ceil_mode=True with kernel {k}, stride {st}, padding {p} on a size-{size} axis: PyTorch drops "
                    f"the last window (it would start in the padding), ONNX keeps it, so the exported shapes "
                    f"would differ. Use ceil_mode=False (with explicit padding) in the source model to export.")


def export_onnx(
    dlgn: DLGN,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    split: bool = False,
    gates_output: bool = False,
    verify: bool = True,
    verify_batch: int | None = None,
    rtol: float = DEFAULT_RTOL,
    gate_tol: float = DEFAULT_GATE_TOL,
    custom_translations: dict[Callable, Callable] | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export the eval-mode (hard-gate) DLGN or DGN to ONNX, verify it with onnxruntime, and report.

    The ONNX graph maps the model's inputs to the source model's outputs (nested outputs are flattened
    to ``output_0, output_1, ...``; a single one is ``output``), with the gating graph, the gates and the
    value graph inside. The model is exported in eval mode whatever mode ``dlgn`` is in (its mode is left
    as it was). Inputs keep the names of the source model's ``forward`` arguments.

    Args:
        dlgn: a converted model (:func:`relu2dlgn.convert` or :func:`relu2dlgn.load`).
        path: the ``.onnx`` file to write. Models over 2 GiB store their weights in ``path + ".data"``.
        example_inputs: input(s) to trace with. Only the batch axis is dynamic: every other dimension is
            fixed to the example's (onnxruntime refuses other shapes), which is also how the shape
            specialisations recorded at conversion (``dlgn.report.specialised``) carry over: they are
            evaluated once, at the example's shape, during tracing. An example of batch 1 is tiled to 2
            for tracing (torch.export specialises size-1 axes).
        dynamic_batch: batch axis symbolic (``"batch"``); ``False`` fixes it to the example's.
        opset: ONNX opset (default: the exporter's, currently 20).
        split: write two files instead, ``X.gating.onnx`` (inputs -> ``gate_0 ... gate_{n-1}``) and
            ``X.value.onnx`` (inputs, ``gate_0 ...`` -> outputs; it applies ``value_input`` itself, so with
            ``"ones"`` it uses the inputs' shape only) for ``path`` = ``X.onnx``; see :func:`split_paths`.
            Feeding the gating file's outputs to the value file computes what the fused file computes.
        gates_output: also output the gates as ``gate_0 ... gate_{n-1}`` (fused file), exactly what
            ``dlgn.eval().gates(x)`` returns: float 0/1 masks for ReLU/LeakyReLU/PReLU sites, a stacked
            ``[2, N, ...]`` mask pair (``q > lo``, ``q > hi``) for ReLU6/Hardtanh, int64 per-plane arg-max
            indices for max-pool sites.
        verify: check the written model (see below); ``False`` skips the check.
        verify_batch: batch size of the verification batch (default: the traced batch + 1; with
            ``dynamic_batch=False`` it must be, and defaults to, the traced batch).
        rtol: tolerance of the value-network check, relative to max |output|.
        gate_tol: how close to a tie a gate that differs between backends must be, relative to max |q| of
            its site.
        custom_translations: passed to torch.onnx as ``custom_translation_table`` ({torch op: onnxscript
            function}) for ops without a built-in ONNX lowering.
        seed: seed of the verification batch.

    Verification (``verify=True``): ``onnx.checker.check_model(full_check=True)`` on every file, then
    onnxruntime (CPU) on a fresh random batch whose batch size differs from the traced one (so the batch
    axis really is dynamic), compared with the PyTorch model in eval mode:

    * **gates**: a gate is a discontinuous function of its pre-activation, so where ``q`` is within rounding
      of a tie (0 for ReLU, lo/hi for Hardtanh, two equal elements of a max-pool window) the two backends
      may legitimately pick different pieces, and one flipped gate can move the output by far more than
      rounding. An output comparison (max or any quantile) can therefore neither pass every correct export
      nor fail every wrong one. Instead every gate that differs must sit at a tie: its distance from the
      tie in PyTorch's pre-activation (``|q|``, ``|q - lo|``, ``|q - hi|`` or the gap between the two
      window elements) must be at most ``gate_tol * max|q|`` of its site. A gating graph that computes
      something else flips gates away from ties and fails.
    * **value network**: onnxruntime's output must equal PyTorch's value network *fed onnxruntime's gates*
      to ``rtol * max|output|`` (max over all elements: with the gates fixed, the computation is
      continuous, so the max is the right statistic).
    * when the fused file has no gate outputs, a copy with gate outputs is what runs the checks above, and
      the written file must reproduce its outputs bit for bit.

    The report also shows the plain end-to-end error against ``dlgn(x)`` (max, 99th percentile, fraction of
    elements beyond ``rtol * max|output|``) and how many gates flipped; these figures include tie flips and
    are informative, not pass/fail criteria.

    Files are written to a temporary directory next to ``path`` and moved into place only after
    verification, with ``os.replace``: an error (including a failed verification) leaves no file at
    ``path``, and an existing file there is replaced only by a verified one; an unwritable directory is
    detected before exporting and writes nothing.

    Returns:
        an :class:`ExportReport` (``print(report)``: errors, op histogram, file sizes, opset, names).

    Raises:
        ExportError: the path cannot be written, torch.export or the ONNX translation fails (the message
            names the DLGN's fx node and module, and the op without ONNX lowering), or verification fails
            (the message has the figures).
    """
    start = time.perf_counter()
    if not isinstance(dlgn, DLGN):
        raise ExportError(f"export_onnx expects a relu2dlgn DLGN, got {type(dlgn).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    examples = tuple(example_inputs)
    dlgn.check_inputs(examples)
    _check_ceil_mode(dlgn, examples)
    if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in examples):
        raise ExportError("example_inputs must be tensors with a leading batch axis")
    if dlgn.device.type != "cpu":
        raise ExportError(f"export_onnx needs the model on the CPU (it is on {dlgn.device}); call dlgn.cpu() and "
                          f"pass CPU example inputs")
    batch0 = examples[0].shape[0]
    if dynamic_batch and batch0 == 1:
        examples = tuple(torch.cat([x, x]) for x in examples)
        batch0 = 2
    if verify_batch is None:
        verify_batch = batch0 + 1 if dynamic_batch else batch0
    elif not dynamic_batch and verify_batch != batch0:
        raise ExportError(f"with dynamic_batch=False the model takes batches of exactly {batch0}; "
                          f"verify_batch={verify_batch} cannot run")

    path = os.fspath(path)
    targets = list(split_paths(path)) if split else [path]
    timings: dict[str, float] = {}
    stage = _Staging(targets)
    try:
        with _eval_mode(dlgn):
            files = _graph_files(dlgn)
            input_names = _unique([s.name for s in dlgn.input_specs])
            gate_names = [f"gate_{i}" for i in range(len(dlgn.sites))]
            with torch.no_grad():
                example_gates = dlgn.gates(*examples)
                example_out = dlgn.value(*dlgn.value_inputs(*examples), *example_gates)
            leaves = pytree.tree_leaves(example_out)
            if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
                raise ExportError(f"the model's outputs must be tensors (possibly nested in tuples, lists or dicts) "
                                  f"to become ONNX outputs; got {[type(t).__name__ for t in leaves]}")
            output_names = _output_names(example_out)
            batch = torch.export.Dim("batch") if dynamic_batch else None
            in_shapes = tuple({0: batch} for _ in examples) if batch is not None else None
            export = functools.partial(_export_part, opset=opset, custom_translations=custom_translations,
                                       files=files, timings=timings)

            written: list[tuple[str, Any]] = []  # (target, ModelProto)
            hidden_gates = None
            if split:
                ep, gating = export(_ExportModule(dlgn, "gating"), examples, in_shapes, input_names, gate_names,
                                    what="gating graph")
                gate_shapes = tuple({a: batch} if a is not None else None for a in _batch_axes(ep))
                _, value = export(_ExportModule(dlgn, "value"), examples + tuple(example_gates),
                                  in_shapes + gate_shapes if batch is not None else None,
                                  input_names + gate_names, output_names, what="value graph")
                written = [(targets[0], gating), (targets[1], value)]
                parts = ["gating", "value"]
            else:
                _, fused = export(_ExportModule(dlgn, "fused", gates_output=True), examples, in_shapes,
                                  input_names, output_names + gate_names, what="DLGN")
                written = [(path, fused)]
                parts = ["fused"]
                if not gates_output:
                    restore = _strip_outputs(fused, set(gate_names))

                    def hidden_gates() -> str | bytes:
                        restore()
                        return _runnable(fused, stage.extra("with_gates.onnx"))
            tick = time.perf_counter()
            for (target, proto), part in zip(written, parts):
                _add_metadata(proto, dlgn, part)
                _save(proto, stage.path(target))
            described = [_describe(proto, stage.path(t), t) for t, proto in written]
            timings["write"] = time.perf_counter() - tick

            verification = None
            if verify:
                verification = _check_and_verify(dlgn, targets, stage, hidden_gates, split, input_names,
                                                 len(output_names), examples, verify_batch, seed, rtol, gate_tol,
                                                 dynamic_batch, timings)
            del written, hidden_gates
        stage.commit()
    finally:
        stage.cleanup()
    return ExportReport(files=described, mode=dlgn.mode, value_input=dlgn.value_input, pool=dlgn.pool,
                        num_sites=len(dlgn.sites), dynamic_batch=dynamic_batch,
                        example_shapes=[tuple(x.shape) for x in examples], gates_output=gates_output and not split,
                        split=split, exporter=EXPORTER, seconds=time.perf_counter() - start,
                        verification=verification, timings=timings)


def _check_and_verify(dlgn: DLGN, targets: list[str], stage: _Staging, hidden_gates: Any | None, split: bool,
                      input_names: list[str], num_outputs: int, examples: tuple[torch.Tensor, ...], batch: int,
                      seed: int, rtol: float, gate_tol: float, dynamic_batch: bool,
                      timings: dict[str, float]) -> Verification:
    """onnx.checker on the staged files, then :func:`_verify` with onnxruntime sessions on them.

    ``hidden_gates``: for a fused file without gate outputs, a callable giving the same model with them
    (loaded only if needed)."""
    import onnx

    tick = time.perf_counter()
    for target in targets:
        try:
            onnx.checker.check_model(stage.path(target), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejects the exported {os.path.basename(target)}: "
                              f"{_root_message(exc)}") from exc
    timings["check"] = time.perf_counter() - tick
    tick = time.perf_counter()

    def load(source: str | bytes) -> Any:
        try:
            return _session(source)
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load the exported model: {_root_message(exc)}") from exc

    sessions = [load(stage.path(t)) for t in targets]

    def run(feeds: dict) -> tuple[list, list | None]:
        if split:
            gating, value = sessions
            gates = _run_onnx(gating, _feeds_for(gating, feeds))
            names = [o.name for o in gating.get_outputs()]
            return _run_onnx(value, _feeds_for(value, {**feeds, **dict(zip(names, gates))})), gates
        res = _run_onnx(sessions[0], _feeds_for(sessions[0], feeds))
        return res[:num_outputs], (res[num_outputs:] if hidden_gates is None else None)

    def run_with_gates(feeds: dict) -> tuple[list, list]:
        session = load(hidden_gates())
        res = _run_onnx(session, _feeds_for(session, feeds))
        return res[:num_outputs], res[num_outputs:]

    try:
        verification = _verify(dlgn, run, run_with_gates if hidden_gates is not None else None, input_names,
                               examples, batch, seed, rtol, gate_tol)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"onnxruntime failed on a batch of {batch} ({'dynamic' if dynamic_batch else 'static'} "
                          f"batch axis): {_root_message(exc)}") from exc
    timings["verify"] = time.perf_counter() - tick
    if not verification.ok:
        raise ExportError(f"the exported ONNX model does not reproduce the PyTorch model; nothing was written to "
                          f"{', '.join(targets)}:\n{verification}")
    return verification

"""Driving the exporter for one part (fused, gating or value): ``torch.export.export`` then ``torch.onnx.export``
of the ExportedProgram, with failures turned into :class:`ExportError` by :mod:`.diagnostics`.

The exporter: torch.onnx's torch.export-based ("dynamo") exporter with onnxscript, fed an ExportedProgram that
we make ourselves with torch.export.export(strict=False). Both exporters reproduce these graphs; we chose
this one because the TorchScript exporter is deprecated since torch 2.9 (a DeprecationWarning on every call,
opsets up to 20 only), jit.trace records one shape and re-derives the batch size through Shape/Gather/
Concat chains (21 Constant + 17 Shape/Gather/Unsqueeze/Concat nodes in a 3-conv test net, none with this
exporter, which also runs onnxscript's optimizer: constant folding, deduplication), whereas torch.export
proves the batch axis symbolic: a model that bakes in the batch size is refused instead of silently
exported. Its cost, measured on the 2-core dev VM (torch.export + translation + onnxscript's optimizer):
~2.5 s resnet18, ~6 s resnet50, ~20 s densenet121, against ~6.5 s for TorchScript on the latter two:
affordable. We call torch.export ourselves rather than let torch.onnx.export do it because torch.onnx falls
back to other capture strategies when torch.export fails (a numpy round trip then becomes a baked-in
constant), and because the exception then carries a traceback we can map back to the DLGN's fx node.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx

from .. import gates
from ..errors import ExportError
from . import diagnostics
from .module import ExportModule
from .passes import onnxruntime_cpu_gates

__all__ = ["EXPORTER", "MIN_OPSET", "supported_opsets", "export_part", "batch_axes"]

logger = logging.getLogger(__name__)

EXPORTER = "torch.export + torch.onnx (onnxscript)"
# torch.onnx implements no lower opset: asked for one, it exports opset 18, tries a version conversion that fails
# for these graphs, and keeps 18, saying so only in a log line
MIN_OPSET = 18


def supported_opsets() -> tuple[int, int]:
    """``(lowest, highest)`` ONNX opset this exporter writes: torch.onnx's lowest implemented opset, and the
    newest that the installed ``onnx`` knows (the version converter's limit)."""
    import onnx
    return MIN_OPSET, int(onnx.defs.onnx_opset_version())


def _written_opset(proto: Any) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress lines and warns about things we handle; keep stdout clean."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield


def export_part(module: ExportModule, args: tuple, dynamic_shapes: tuple | None, input_names: list[str],
                output_names: list[str], *, what: str, opset: int | None, custom_translations: dict | None,
                files: diagnostics.GraphFiles, timings: dict[str, float], portable: bool = False) -> tuple[Any, Any]:
    """torch.export the module, then translate the ExportedProgram to an ONNX ModelProto: ``(ep, proto)``.

    ``portable``: hard max-pool gates as the compare-and-select chain and nothing rewritten (ops every major runtime
    accelerates); otherwise the form for onnxruntime's CPU provider: max-pool gates by equality with the window
    maximum and, in float32, :func:`~relu2dlgn.export.passes.onnxruntime_cpu_gates`.

    Raises :class:`ExportError` when either step fails, or when the model written has another opset than the
    ``opset`` asked for (torch.onnx falls back to its own when a version conversion fails)."""
    tick = time.perf_counter()
    try:
        with _quiet(), gates.gate_form("portable" if portable else "onnx"):
            ep = torch.export.export(module, args, strict=False,
                                     dynamic_shapes=None if dynamic_shapes is None else (dynamic_shapes,))
    except Exception as exc:
        raise diagnostics.export_failure(exc, files, what=what, dynamic=dynamic_shapes is not None,
                                         batch=args[0].shape[0]) from exc
    timings["torch.export"] = timings.get("torch.export", 0.0) + time.perf_counter() - tick
    tick = time.perf_counter()
    try:
        with _quiet():
            program = torch.onnx.export(ep, (), None, dynamo=True, input_names=input_names,
                                        output_names=output_names, opset_version=opset,
                                        custom_translation_table=custom_translations, optimize=True,
                                        verbose=False)
    except Exception as exc:
        raise diagnostics.translation_failure(exc, files, what=what) from exc
    if not portable:
        masks, selects = onnxruntime_cpu_gates(program.model)
        logger.debug("%s: %d gates as NCHWc masks, %d Where as arithmetic", what, masks, selects)
    proto = program.model_proto
    if opset is not None and _written_opset(proto) != opset:
        lo, hi = supported_opsets()
        raise ExportError(f"{what}: opset {opset} was asked for but torch.onnx wrote opset {_written_opset(proto)} "
                          f"(its version conversion failed); this exporter writes opsets {lo} to {hi}")
    timings["onnx"] = timings.get("onnx", 0.0) + time.perf_counter() - tick
    return ep, proto


def batch_axes(ep: Any) -> list[int | None]:
    """For each output of an ExportedProgram, the axis whose size is symbolic (the batch axis), if any."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    axes: list[int | None] = []
    for arg in out_node.args[0]:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        shape = getattr(val, "shape", ())
        axes.append(next((i for i, s in enumerate(shape) if isinstance(s, torch.SymInt)), None))
    return axes

"""Export failures mapped back to the DLGN: which fx node of the gating or value graph (and which module) a
torch.export or ONNX translation failure comes from, and the :class:`ExportError` that says so.

What is read structurally, and the one place where text is parsed:

* the exception types: torch.export's batch-axis specialisation is a ``ConstraintViolationError`` in the
  exception chain, a missing ONNX lowering is torch.onnx's ``DispatchError``;
* where torch.export failed: the frames of the exception's traceback (file name and line), matched against the
  generated ``forward`` code of the DLGN's two ``GraphModule``\\ s; the line's assignment target (read with
  :mod:`ast`) is the fx node;
* which node torch.onnx was translating: the ``torch.fx.Node`` its translation frames hold (see
  :func:`_node_being_translated`), and that node's op (``node.target``);
* where that node comes from in the DLGN: its ``meta["stack_trace"]``. torch keeps that stack only as
  formatted text (Python's ``File "...", line N, in f`` lines), so :data:`STACK_FRAME` parses it; a test
  (``test_stack_trace_format_is_what_diagnostics_parse``) pins the format on a real ExportedProgram.
"""
from __future__ import annotations

import ast
import linecache
import re
import traceback

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from ..dlgn import DLGN
from ..errors import ExportError

__all__ = ["GraphFiles", "STACK_FRAME", "graph_files", "fx_node_at", "locate_in_stack_trace", "root_message",
           "export_failure", "translation_failure"]

GraphFiles = dict[str, tuple[str, fx.GraphModule]]  # generated-code file name -> (graph name, GraphModule)

# A frame of a formatted Python stack (``traceback.format_list``), as torch stores it in ``meta["stack_trace"]``.
# A regex because torch gives that stack only as text; pinned by test_stack_trace_format_is_what_diagnostics_parse.
STACK_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')

# torch colours parts of its messages (ANSI escapes); they are removed from the text shown in our messages.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _dispatch_error() -> type | tuple:
    """torch.onnx's "no ONNX function for this op" exception type. torch.onnx exports no public name for it
    (torch 2.15: ``torch.onnx._internal.exporter._errors.DispatchError``); if it moves, the message falls back to
    the generic translation failure and test_op_without_onnx_lowering_is_named fails."""
    try:
        from torch.onnx._internal.exporter._errors import DispatchError
    except ImportError:  # pragma: no cover
        return ()
    return DispatchError


def graph_files(dlgn: DLGN) -> GraphFiles:
    """The DLGN's graphs by the file name of their generated ``forward`` code (each GraphModule has its own)."""
    out = {}
    for name in ("gating", "value"):
        gm = getattr(dlgn, name)
        out[type(gm).forward.__code__.co_filename] = (name, gm)
    return out


def _assigned_name(line: str) -> str | None:
    """``x`` for the generated code line ``x = op(...);  y = None`` (fx writes one node per line)."""
    try:
        statement = ast.parse(line.strip()).body[0]
    except (SyntaxError, IndexError):
        return None
    if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
        return statement.targets[0].id
    return None


def fx_node_at(files: GraphFiles, filename: str, lineno: int) -> str | None:
    """The DLGN fx node whose generated code is at ``filename:lineno``, described, or ``None``."""
    if filename not in files:
        return None
    graph_name, gm = files[filename]
    name = _assigned_name(linecache.getline(filename, lineno))
    node = next((n for n in gm.graph.nodes if name and n.name == name), None)
    if node is None:
        return None
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and hasattr(node.target, "_schema"):
        target = str(node.target)
    return (f"node '{node.name}' of the {graph_name} graph ({node.op} {target}, module "
            f"'{node.meta.get('module_path', '') or '<root>'}')")


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes / contexts, outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _locate_in_traceback(exc: BaseException, files: GraphFiles) -> str | None:
    """The innermost DLGN fx node among the frames of the exception chain's tracebacks."""
    found = None
    for e in _chain(exc):
        for frame in traceback.extract_tb(e.__traceback__):
            found = fx_node_at(files, frame.filename, frame.lineno) or found
    return found


def locate_in_stack_trace(stack_trace: str | None, files: GraphFiles) -> str | None:
    """The innermost DLGN fx node in a formatted stack (an ExportedProgram node's ``meta["stack_trace"]``)."""
    found = None
    for m in STACK_FRAME.finditer(stack_trace or ""):
        found = fx_node_at(files, m.group("file"), int(m.group("line"))) or found
    return found


def _node_being_translated(exc: BaseException) -> fx.Node | None:
    """The ExportedProgram node torch.onnx was translating when it failed. torch.onnx attaches no node to its
    exceptions (its ConversionError only prints it); its translation frames (``_translate_fx_graph``, the
    ``_handle_*_node`` functions) hold it as their argument / loop variable ``node``, and the exception's
    traceback keeps those frames. The innermost wins (subgraphs are translated in nested frames)."""
    found = None
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            node = tb.tb_frame.f_locals.get("node")
            if isinstance(node, fx.Node):
                found = node
            tb = tb.tb_next
    return found


def root_message(exc: BaseException) -> str:
    """The innermost two causes' first lines (torch's outer messages are long boilerplate)."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__
    msgs = []
    for e in reversed(chain[-2:] if len(chain) > 1 else chain):
        text = _ANSI.sub("", str(e)).strip()
        msgs.append(f"{type(e).__name__}: {text.splitlines()[0].rstrip('.') if text else ''}")
    return " <- ".join(msgs)


def export_failure(exc: BaseException, files: GraphFiles, *, what: str, dynamic: bool, batch: int) -> ExportError:
    """The error for a failed ``torch.export.export`` of the ``what`` (traced with a batch of ``batch``)."""
    where = _locate_in_traceback(exc, files)
    # The batch axis is the only dimension declared dynamic, so a violated constraint is the batch axis's.
    if dynamic and any(isinstance(e, ConstraintViolationError) for e in _chain(exc)):
        return ExportError(
            f"cannot export the {what} with a dynamic batch axis: the model's code specialises on the batch "
            f"size{' at ' + where if where else ''} ({root_message(exc)}). Export with dynamic_batch=False "
            f"(the ONNX model then takes batches of exactly {batch})")
    return ExportError(
        f"torch.export cannot capture the {what}"
        + (f": it fails at {where}" if where else "") + f": {root_message(exc)}. Ops that run Python "
        f"on tensor data (numpy round trips, .item(), data-dependent branches) cannot be exported; a model "
        f"converted with strict=False keeps such ops (see dlgn.report).")


def translation_failure(exc: BaseException, files: GraphFiles, *, what: str) -> ExportError:
    """The error for a failed ONNX translation (``torch.onnx.export``) of the ``what``'s ExportedProgram."""
    node = _node_being_translated(exc)
    where = locate_in_stack_trace(node.meta.get("stack_trace"), files) if node is not None else None
    op = str(node.target) if node is not None else None
    if op is not None and any(isinstance(e, _dispatch_error()) for e in _chain(exc)):
        return ExportError(
            f"no ONNX lowering for op {op}" + (f" at {where}" if where else "")
            + f" in the {what}; a model converted with strict=False keeps ops that are not gates (see "
            f"dlgn.report). Register a translation with export_onnx(..., custom_translations={{"
            f"torch.ops.{op}: onnxscript_function}}) or replace the op. ({root_message(exc)})")
    at = f" at op {op}" + (f", {where}" if where else "") if op else ""
    return ExportError(f"ONNX translation of the {what} failed{at}: {root_message(exc)}")


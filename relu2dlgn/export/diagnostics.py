"""Export failures mapped back to the DLGN: which fx node of the gating or value graph (and which module) a
torch.export or ONNX translation failure comes from, and the :class:`ExportError` that says so."""
from __future__ import annotations

import linecache
import re
import traceback
from typing import Any

import torch.fx as fx

from ..dlgn import DLGN
from ..errors import ExportError

__all__ = ["GraphFiles", "graph_files", "root_message", "export_failure", "translation_failure"]

GraphFiles = dict[str, tuple[str, fx.GraphModule]]  # generated-code file name -> (graph name, GraphModule)

_EVAL_KEY = re.compile(r'File "(<eval_with_key>\.\d+)", line (\d+)')


def graph_files(dlgn: DLGN) -> GraphFiles:
    out = {}
    for name in ("gating", "value"):
        gm = getattr(dlgn, name)
        out[type(gm).forward.__code__.co_filename] = (name, gm)
    return out


def _fx_node_at(files: GraphFiles, filename: str, lineno: int) -> str | None:
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


def _locate_in_traceback(exc: BaseException, files: GraphFiles) -> str | None:
    found = None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for fs in traceback.extract_tb(exc.__traceback__):
            found = _fx_node_at(files, fs.filename, fs.lineno) or found
        exc = exc.__cause__ or exc.__context__
    return found


def _locate_in_stack_trace(stack_trace: str, files: GraphFiles) -> str | None:
    found = None
    for filename, lineno in _EVAL_KEY.findall(stack_trace or ""):
        found = _fx_node_at(files, filename, int(lineno)) or found
    return found


def root_message(exc: BaseException) -> str:
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


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def export_failure(exc: BaseException, files: GraphFiles, *, what: str, dynamic: bool, batch: int) -> ExportError:
    """The error for a failed ``torch.export.export`` of the ``what`` (traced with a batch of ``batch``)."""
    text = str(exc)
    where = _locate_in_traceback(exc, files)
    if dynamic and ("batch" in text and ("Constraints violated" in text or "specializ" in text
                                         or "specialis" in text)):
        return ExportError(
            f"cannot export the {what} with a dynamic batch axis: the model's code specialises on the batch "
            f"size{' at ' + where if where else ''} ({root_message(exc)}). Export with dynamic_batch=False "
            f"(the ONNX model then takes batches of exactly {batch})")
    return ExportError(
        f"torch.export cannot capture the {what}"
        + (f": it fails at {where}" if where else "") + f": {root_message(exc)}. Ops that run Python "
        f"on tensor data (numpy round trips, .item(), data-dependent branches) cannot be exported; a model "
        f"converted with strict=False keeps such ops (see dlgn.report).")


def translation_failure(exc: BaseException, ep: Any, files: GraphFiles, *, what: str) -> ExportError:
    """The error for a failed ONNX translation of the ExportedProgram ``ep`` of the ``what``."""
    text = "\n".join(str(e) for e in _chain(exc))
    m = re.search(r"Error when translating node %(\w+)", text)
    node = next((n for n in ep.graph.nodes if m and n.name == m.group(1)), None)
    where = _locate_in_stack_trace(node.meta.get("stack_trace", ""), files) if node is not None else None
    op = str(node.target) if node is not None else None
    m_op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if m_op:
        op = f"{m_op.group(1)}.{m_op.group(2)}"
    if m_op:
        return ExportError(
            f"no ONNX lowering for op {op}" + (f" at {where}" if where else "")
            + f" in the {what}; a model converted with strict=False keeps ops that are not gates (see "
            f"dlgn.report). Register a translation with export_onnx(..., custom_translations={{"
            f"torch.ops.{op}: onnxscript_function}}) or replace the op. ({root_message(exc)})")
    at = f" at op {op}" + (f", {where}" if where else "") if op else ""
    return ExportError(f"ONNX translation of the {what} failed{at}: {root_message(exc)}")

"""Writing the exported ModelProtos: metadata, files over 2 GiB (external data), the report's description of
a file, and staging (files are written beside their targets and moved into place only once verified)."""
from __future__ import annotations

import collections
import contextlib
import os
import time
from typing import Any, Iterator, Sequence

from .._version import __version__
from ..dlgn import DLGN
from ..errors import ExportError
from ..utils.fs import StagedFiles
from .report import OnnxFile

__all__ = ["TWO_GIB", "staged", "write", "add_metadata", "save", "files_of", "describe", "runnable"]


@contextlib.contextmanager
def staged(targets: Sequence[str]) -> Iterator[StagedFiles]:
    """:class:`~relu2dlgn.utils.fs.StagedFiles` for ``targets`` (files are written and verified beside them, then
    committed with ``os.replace``; on exit whatever was not committed is removed). A target that cannot be
    written raises :class:`ExportError` before anything is written."""
    try:
        stage = StagedFiles(list(targets))
    except (IsADirectoryError, FileNotFoundError) as exc:  # its checks: a target is a directory, or its directory
        raise ExportError(str(exc)) from exc               # is missing; the message names them
    except OSError as exc:  # creating the staging directory failed (permissions, read-only file system, ...)
        raise ExportError(f"cannot write '{os.path.abspath(targets[0])}': {exc.strerror or exc} (nothing was "
                          f"written)") from exc
    with stage:
        yield stage


def write(protos: Sequence[tuple[str, str, Any]], stage: StagedFiles, dlgn: DLGN,
          timings: dict[str, float]) -> list[OnnxFile]:
    """Write each ``(target, part, ModelProto)`` to its staged path, with relu2dlgn's metadata; describe them."""
    tick = time.perf_counter()
    for target, part, proto in protos:
        add_metadata(proto, dlgn, part)
        save(proto, stage.path(target))
    described = [describe(proto, stage.path(target), target) for target, _, proto in protos]
    timings["write"] = time.perf_counter() - tick
    return described


def add_metadata(model_proto: Any, dlgn: DLGN, part: str) -> None:
    meta = {"relu2dlgn.version": __version__, "relu2dlgn.part": part, "relu2dlgn.mode": dlgn.mode,
            "relu2dlgn.value_input": dlgn.value_input, "relu2dlgn.pool": dlgn.pool,
            "relu2dlgn.gate_kinds": ",".join(s.kind for s in dlgn.sites)}
    for k, v in meta.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, v
    model_proto.producer_name = "relu2dlgn"
    model_proto.producer_version = __version__


TWO_GIB = 2**31 - 2**20


def save(model_proto: Any, path: str) -> None:
    """Write ``model_proto``; over 2 GiB its weights go to ``path + ".data"`` (this moves them out of the proto,
    which then refers to that file)."""
    import onnx

    if model_proto.ByteSize() > TWO_GIB:
        onnx.save_model(model_proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data")
    else:
        onnx.save_model(model_proto, path)


def files_of(path: str) -> list[str]:
    data = path + ".data"
    return [data, path] if os.path.exists(data) else [path]


def describe(model: Any, staged_path: str, final_path: str) -> OnnxFile:
    ops: collections.Counter = collections.Counter()
    for node in model.graph.node:
        ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    for fn in model.functions:
        for node in fn.node:
            ops[node.op_type] += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    size = sum(os.path.getsize(p) for p in files_of(staged_path))
    initialisers = {i.name for i in model.graph.initializer}
    return OnnxFile(final_path, size, opset, [i.name for i in model.graph.input if i.name not in initialisers],
                    [o.name for o in model.graph.output], dict(ops))


def runnable(model: Any, beside: str) -> str | bytes:
    """What onnxruntime can load ``model`` from: its bytes, or, once its weights live in an external data
    file (over 2 GiB: :func:`save` moved them there), a file ``beside`` in that file's directory."""
    from onnx.external_data_helper import uses_external_data

    if model.ByteSize() > TWO_GIB or any(uses_external_data(t) for t in model.graph.initializer):
        save(model, beside)
        return beside
    return model.SerializeToString()

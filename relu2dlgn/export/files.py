"""Writing the exported ModelProtos: metadata, files over 2 GiB (external data), the report's description of
a file, and staging (files are written beside their targets and moved into place only once verified)."""
from __future__ import annotations

import collections
import os
import shutil
import tempfile
from typing import Any

from .._version import __version__
from ..dlgn import DLGN
from ..errors import ExportError
from .report import OnnxFile

__all__ = ["TWO_GIB", "add_metadata", "save", "files_of", "describe", "runnable", "Staging"]


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


def describe(model: Any, staged: str, final_path: str) -> OnnxFile:
    ops: collections.Counter = collections.Counter()
    for node in model.graph.node:
        ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    for fn in model.functions:
        for node in fn.node:
            ops[node.op_type] += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    size = sum(os.path.getsize(p) for p in files_of(staged))
    initialisers = {i.name for i in model.graph.initializer}
    return OnnxFile(final_path, size, opset, [i.name for i in model.graph.input if i.name not in initialisers],
                    [o.name for o in model.graph.output], dict(ops))


def runnable(model: Any, beside: str) -> str | bytes:
    """What onnxruntime can load ``model`` from: its bytes, or, once its weights live in an external data
    file (over 2 GiB: ``_save`` moved them there), a file ``beside`` in that file's directory."""
    from onnx.external_data_helper import uses_external_data

    if model.ByteSize() > TWO_GIB or any(uses_external_data(t) for t in model.graph.initializer):
        save(model, beside)
        return beside
    return model.SerializeToString()


class Staging:
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
            for src in files_of(staged):  # external data first, so the model never points at a missing file
                os.replace(src, os.path.join(os.path.dirname(target), os.path.basename(src)))

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

"""Exporting the source network to ONNX (the reference a DLGN's latency is compared with) and timing two ONNX
files side by side in onnxruntime."""
from __future__ import annotations

import contextlib
import io
import statistics
import time
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..utils.modes import eval_mode


def export_source(model: nn.Module, path: str, example: torch.Tensor) -> float:
    """Write ``model`` (eval mode, dynamic batch axis) to ``path`` with the same exporter as
    :func:`relu2dlgn.export_onnx`; returns the max |error| of onnxruntime against PyTorch on ``example``.

    Raises :class:`ExportError` if onnxruntime's output differs by more than 1e-4 of max|y|."""
    import onnxruntime as ort

    batch = torch.export.Dim("batch")
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        torch.onnx.export(ep, (), path, dynamo=True, input_names=["x"], output_names=["output"], optimize=True,
                          verbose=False)
        ref = model(example).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": example.numpy()})[0]
    err = float(np.abs(out - ref).max())
    if err > 1e-4 * max(float(np.abs(ref).max()), 1e-12):
        raise ExportError(f"the source's ONNX file {path} differs from PyTorch by {err:.3g}")
    return err


def compare_latency(paths: Sequence[str], example: np.ndarray, runs: int, threads: int) -> list[float]:
    """Median seconds per run of each ONNX file on ``example``, runs interleaved (file 1, file 2, file 1, ...)
    after one warm-up each, so that load changes hit all files alike."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in paths]
    names = [s.get_inputs()[0].name for s in sessions]
    for s, n in zip(sessions, names):
        s.run(None, {n: example})
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, n) in enumerate(zip(sessions, names)):
            t = time.perf_counter()
            s.run(None, {n: example})
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]

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

The package, one job per module: :mod:`.api` (:func:`export_onnx`, the orchestration), :mod:`.module` (the
``nn.Module`` that is exported), :mod:`.torch_export` (torch.export + torch.onnx for one part),
:mod:`.diagnostics` (failures mapped back to the DLGN's fx nodes), :mod:`.passes` (edits of the ONNX graph),
:mod:`.files` (writing and staging the files), :mod:`.verify` (onnx.checker + onnxruntime against PyTorch) and
:mod:`.report` (what is returned).
"""
from .api import (DEFAULT_GATE_TOL, DEFAULT_RTOL, ExportOptions, default_tolerances, example_inputs_for, export_onnx,
                  split_paths)
from .report import ExportReport, OnnxFile, SiteAgreement, Verification
from .torch_export import EXPORTER, supported_opsets

__all__ = ["export_onnx", "ExportReport", "OnnxFile", "Verification", "SiteAgreement", "split_paths",
           "DEFAULT_RTOL", "DEFAULT_GATE_TOL", "default_tolerances", "EXPORTER", "supported_opsets", "ExportOptions",
           "example_inputs_for"]

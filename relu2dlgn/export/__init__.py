"""ONNX export of a converted model: ``relu2dlgn.export_onnx(dlgn, "model.onnx", example_inputs=(x,))``.

The eval-mode (hard-gate) DLGN/DGN is exported as **one** ONNX graph ``inputs -> outputs``: the gating graph,
the gates and the value graph all inside it. Gates lower to exact ONNX ops, in one of two forms:

==========================  ==========================================  =============================================
gate kind                   default (onnxruntime's CPU provider)        ``portable=True``
==========================  ==========================================  =============================================
relu / leaky_relu / prelu   mask ``HardSigmoid(Conv(q, 2^127), 2^127)``  ``Not(LessOrEqual(q, 0))``; the value net
                            (one fused NCHWc kernel); ``Mul(v, mask)``   ``Where(gate, v, 0)`` (``v a`` for leaky)
hardtanh / relu6            two masks; the pieces by arithmetic         two masks; nested ``Where``
maxpool                     arg max by equality with ``MaxPool``'s      the compare-and-select chain over the window
                            window maximum; ``GatherElements``          offsets (``Slice``, ``Greater``, ``IsNaN``,
                                                                        ``Or``, ``Where``); the value net's select
                                                                        chain (``Equal``, ``Where``)
==========================  ==========================================  =============================================

Both are exact against PyTorch; the default form except that an infinite value where a gate is off gives NaN and
a NaN pre-activation is not PyTorch's (see :mod:`.passes`). So the ONNX gates are those of PyTorch except where
the two backends' pre-activations straddle a tie (``q`` within rounding of 0 / lo / hi, or two window elements
within rounding of each other). See :func:`export_onnx` for how verification accounts for that.

The package, one job per module: :mod:`.api` (:func:`export_onnx`, the orchestration), :mod:`.module` (the
``nn.Module`` that is exported), :mod:`.torch_export` (torch.export + torch.onnx for one part),
:mod:`.diagnostics` (failures mapped back to the DLGN's fx nodes), :mod:`.passes` (edits of the ONNX graph),
:mod:`.files` (writing and staging the files), :mod:`.verify` (onnx.checker + onnxruntime against PyTorch) and
:mod:`.report` (what is returned).
"""
from .api import (DEFAULT_GATE_TOL, DEFAULT_RTOL, ExportDType, ExportOptions, default_tolerances, example_inputs_for,
                  export_onnx, split_paths)
from .report import ExportReport, OnnxFile, SiteAgreement, Verification
from .torch_export import EXPORTER, supported_opsets

__all__ = ["export_onnx", "ExportReport", "OnnxFile", "Verification", "SiteAgreement", "split_paths",
           "DEFAULT_RTOL", "DEFAULT_GATE_TOL", "default_tolerances", "EXPORTER", "supported_opsets", "ExportOptions",
           "example_inputs_for", "ExportDType"]

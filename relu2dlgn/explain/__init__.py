"""Reading a converted model: gate statistics, gate agreement with the source, the neural path kernel (NPK), the
value network's tangent kernel (NTK), exact gate templates and gradient similarity — with pictures.

``from relu2dlgn import explain`` then::

    stats = explain.gate_stats(dlgn, loader)                    # per site and overall
    agree = explain.gate_agreement(dlgn, source_model, loader)  # per site: DLGN gates == source gates
    K = explain.npk(dlgn, x)                                    # (n, n) neural path kernel
    theta = explain.ntk(dlgn, x)                                # value-network tangent kernel, gates fixed
    T = explain.gate_templates(dlgn, site=3)                    # exact affine maps of a site's pre-activations
    S = explain.gradient_similarity(model, x, y, metric="euclidean")
    explain.report(dlgn, loader, out="report/", source=model)   # PNGs + report.json + report.md

One module per instrument: :mod:`.stats`, :mod:`.agreement`, :mod:`.npk` (with :mod:`.pathsum`, the unit-weight
value graph), :mod:`.ntk` and :mod:`.similarity` (with :mod:`.tangent`, per-example gradients), :mod:`.templates`,
:mod:`.plots` and :mod:`.report`. The mathematics: ``DUALITY.md``.
"""
from .agreement import GateAgreement, SiteAgreement, gate_agreement
from .npk import cosine_normalize, kernel_alignment, npk
from .ntk import ntk
from .report import ExplainReport, ReportOptions, report
from .similarity import Similarity, gradient_similarity, similarity_by_metric
from .stats import GateStats, SiteStats, gate_stats
from .tangent import Features, per_example_gradients
from .templates import Templates, gate_templates

__all__ = [
    "gate_stats", "GateStats", "SiteStats",
    "gate_agreement", "GateAgreement", "SiteAgreement",
    "npk", "cosine_normalize", "kernel_alignment",
    "ntk", "per_example_gradients", "Features",
    "gate_templates", "Templates",
    "gradient_similarity", "similarity_by_metric", "Similarity",
    "report", "ExplainReport", "ReportOptions",
]

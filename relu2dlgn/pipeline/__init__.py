"""The main job, ``relu2dlgn run``: from a trained ReLU network to a verified ONNX DLGN with its report.

1. get a trained source network (``--checkpoint``, or train ``--model`` on the data);
2. convert it in one call (the gate-site summary is logged);
3. fine-tune the DLGN with distillation from the source;
4. export it to ONNX and verify it in onnxruntime; export the source too and compare their latency;
5. write the interpretability report.

Each step records its results in ``OUT/run.json``; ``--resume`` continues from the last finished step. The
resolved options are written to ``OUT/config.yaml``. :func:`run` returns a :class:`RunResult` whose
``table()`` is the closing table.
"""
from .config import RunConfig
from .runner import RunResult, run

__all__ = ["RunConfig", "RunResult", "run"]

"""The steps of the main job, each a function of the shared :class:`Context` returning what it records.

source → convert → finetune → export → report; each step reads what the earlier ones wrote (weights, the
fine-tuned model directory), so a resumed run can start at any of them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..convert import convert
from ..data import Data, load_data, make_loader
from ..dlgn import DLGN, load
from ..explain.report import report
from ..export import example_inputs_for, export_onnx
from ..training import evaluate, finetune, latest_checkpoint, train_classifier
from ..training.checkpoint import MODEL_DIR
from ..training.student import ClassifierStudent
from ..zoo import create_model
from .config import RunConfig
from .latency import compare_latency, export_source

log = logging.getLogger(__name__)

SOURCE_DIR = "source"
DLGN_ONNX, SOURCE_ONNX = "dlgn.onnx", "source.onnx"
REPORT_DIR = "report"


class Context:
    """What the steps share: the config, the output directory, the data and loaders, the source network."""

    def __init__(self, cfg: RunConfig, resuming: bool):
        self.cfg = cfg
        self.out = cfg.out_dir
        self.resuming = resuming
        d = cfg.dataset
        self.data: Data = load_data(d.data, d.data_root, image_size=d.image_size, channels=d.channels,
                                    download=d.download)
        seed = cfg.training.output.seed or 0
        workers = d.workers if d.workers is not None else 0
        self.train_loader = make_loader(self.data.train, d.batch_size, train=True, workers=workers, seed=seed)
        self.val_loader = make_loader(self.data.val, 256, train=False, workers=workers)
        self.example = self.data.example_inputs()
        self._source: nn.Module | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def runtime_options(self) -> dict[str, Any]:
        rt = self.cfg.training.runtime
        return {"device": rt.device, "amp": rt.amp, "channels_last": rt.channels_last, "progress": rt.progress}

    def build_source(self, checkpoint: str | None) -> nn.Module:
        kwargs: dict[str, Any] = {"num_classes": self.data.num_classes}
        if self.data.in_chans != 3:
            kwargs["in_chans"] = self.data.in_chans
        return create_model(self.cfg.source.model, checkpoint=checkpoint, **kwargs).eval()

    def source_weights(self) -> str | None:
        """The trained source's weights: ``--checkpoint``, or those the source step wrote."""
        if self.cfg.source.checkpoint:
            return self.cfg.source.checkpoint
        return self.path(SOURCE_DIR, MODEL_DIR, ClassifierStudent.WEIGHTS)

    @property
    def source(self) -> nn.Module:
        if self._source is None:
            self._source = self.build_source(self.source_weights())
        return self._source

    def forget_source(self) -> None:
        """Drop the source held in memory; the next use loads :meth:`source_weights`."""
        self._source = None

    def convert(self) -> DLGN:
        torch.manual_seed(self.cfg.training.output.seed or 0)
        return convert(self.source, example_inputs=self.example, **dataclasses.asdict(self.cfg.conversion))


def step_source(ctx: Context) -> dict[str, Any]:
    """Get a trained source network: ``--checkpoint``'s weights, or train the model on the data."""
    cfg = ctx.cfg
    if cfg.source.checkpoint:
        acc = evaluate(ctx.source, ctx.val_loader, **ctx.runtime_options())["val_acc"]
        return {"trained_here": False, "accuracy": acc, "weights": cfg.source.checkpoint}
    torch.manual_seed(cfg.training.output.seed or 0)
    model = ctx.build_source(None)
    st = cfg.source_training
    out_dir = ctx.path(SOURCE_DIR)
    result = train_classifier(model, ctx.train_loader, ctx.val_loader, epochs=st.source_epochs, lr=st.source_lr,
                              out_dir=out_dir, resume=ctx.resuming and latest_checkpoint(out_dir) is not None,
                              seed=cfg.training.output.seed, **ctx.runtime_options())
    ctx.forget_source()  # later steps (and resumed runs) load the saved weights
    return {"trained_here": True, "accuracy": result.final["val_acc"], "epochs": st.source_epochs,
            "weights": ctx.source_weights(), "metrics": os.path.join(out_dir, "metrics.jsonl")}


def step_convert(ctx: Context) -> dict[str, Any]:
    """Convert the source in one call; the DLGN's accuracy (hard gates) and gate agreement before training."""
    dlgn = ctx.convert()
    log.info("%s", dlgn.report)  # the gate-site summary
    metrics = evaluate(dlgn, ctx.val_loader, teacher=ctx.source, example_inputs=ctx.example,
                       **ctx.runtime_options())
    return {"sites": len(dlgn.sites), "kinds": dlgn.report.kind_counts(), "accuracy": metrics["val_acc"],
            "gate_agreement": metrics.get("val_gate_agreement")}


def step_finetune(ctx: Context) -> dict[str, Any]:
    """Fine-tune the converted DLGN with distillation from the source (files: metrics.jsonl, checkpoints/,
    model/ in the run's directory)."""
    cfg = ctx.cfg
    dlgn = ctx.convert()
    resume = ctx.resuming and latest_checkpoint(ctx.out) is not None
    training = dataclasses.replace(cfg.training, output=dataclasses.replace(cfg.training.output, out_dir=ctx.out,
                                                                            resume=resume))
    result = finetune(dlgn, ctx.train_loader, ctx.val_loader, teacher=ctx.source, config=training,
                      example_inputs=ctx.example)
    final = result.final
    return {"accuracy": final.get("val_acc"), "gate_agreement": final.get("val_gate_agreement"),
            "best_accuracy": result.best_val_acc, "epochs": cfg.training.epochs,
            "model": ctx.path(MODEL_DIR), "metrics": ctx.path("metrics.jsonl"), "summary": result.summary}


def step_export(ctx: Context) -> dict[str, Any]:
    """Export the fine-tuned DLGN to ONNX and verify it in onnxruntime; export the source too and time both."""
    cfg = ctx.cfg
    dlgn = load(ctx.path(MODEL_DIR))
    o = cfg.export
    examples = example_inputs_for(dlgn, o.batch, o.input_size)
    kwargs = {k: v for k, v in dataclasses.asdict(o).items() if k not in ("batch", "input_size")}
    report = export_onnx(dlgn, ctx.path(DLGN_ONNX), examples, **kwargs)
    log.debug("%s", report)
    v = report.verification
    rec: dict[str, Any] = {"onnx": report.paths, "verified": v is not None and v.ok,
                           "max_abs_error": v.max_abs if v else None,
                           "relative_error": (v.max_abs / v.scale if v and v.scale else None)}
    lat = cfg.latency
    if lat.latency_runs and not o.split:
        shape = examples[0].shape[1:]
        source_onnx = ctx.path(SOURCE_ONNX)
        export_source(ctx.source, source_onnx, torch.randn(2, *shape, dtype=dlgn.dtype))
        x = np.random.default_rng(0).standard_normal((lat.latency_batch, *shape)).astype(np.float32)
        t_dlgn, t_src = compare_latency([ctx.path(DLGN_ONNX), source_onnx], x, lat.latency_runs, lat.latency_threads)
        rec.update({"source_onnx": source_onnx, "latency_ms": {"dlgn": t_dlgn * 1e3, "source": t_src * 1e3},
                    "latency_ratio": t_dlgn / t_src, "latency_batch": lat.latency_batch,
                    "latency_threads": lat.latency_threads})
    return rec


def step_report(ctx: Context) -> dict[str, Any]:
    """The interpretability report of the fine-tuned DLGN on the validation data (gate statistics and agreement
    with the source, NPK, templates, gradient similarity): ``report/report.md`` with its PNGs and JSON."""
    dlgn = load(ctx.path(MODEL_DIR)).eval()
    result = report(dlgn, ctx.val_loader, ctx.path(REPORT_DIR), source=ctx.source,
                    progress=ctx.cfg.training.runtime.progress, **dataclasses.asdict(ctx.cfg.report))
    log.info("%s", result)
    n = result.numbers
    return {"report": os.path.join(result.out, "report.md"), "figures": sorted(result.figures.values()),
            "gate_on_fraction": n["gate_stats"]["on_fraction"],
            "npk_alignment": (n.get("npk") or {}).get("alignment"),
            "agreement": (n.get("agreement") or {}).get("overall")}


STEPS: list[tuple[str, Callable[[Context], dict[str, Any]]]] = [
    ("source", step_source), ("convert", step_convert), ("finetune", step_finetune), ("export", step_export),
    ("report", step_report),
]

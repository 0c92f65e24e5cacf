"""The options of the main job (``relu2dlgn run``): the existing groups (model, data, conversion, fine-tuning,
export) composed with the job's own defaults, plus how the source is trained and how latency is measured."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..convert import ConvertOptions
from ..data import DataOptions
from ..errors import OptionError
from ..explain.report import ReportOptions
from ..export import ExportOptions
from ..options import at_least, group, option, positive
from ..training import FinetuneConfig
from ..zoo import ModelOptions

DEFAULT_MODEL = "timm:resnet10t"


@dataclass
class SourceTraining:
    """How the source ReLU network is trained when no ``--checkpoint`` is given."""

    source_epochs: int = option(8, "epochs of training the source network (without --checkpoint)",
                                check=at_least(1))
    source_lr: float = option(2e-3, "learning rate of the source network's training", check=positive)


@dataclass
class Latency:
    """How the DLGN's and the source's ONNX files are timed in onnxruntime (interleaved runs, medians)."""

    latency_batch: int = option(32, "batch size of the latency measurement", check=at_least(1))
    latency_runs: int = option(10, "timed runs of each model (0: do not measure)", check=at_least(0))
    latency_threads: int = option(1, "onnxruntime intra-op threads", check=at_least(1))


@dataclass
class RunConfig:
    """Everything ``relu2dlgn run`` does: train (or load) a source network, convert, fine-tune with
    distillation, export and verify, report. ``out`` defaults to ``runs/<name>``."""

    name: str = option("digits-resnet10t", "the run's name (its default output directory is runs/<name>)")
    out: str | None = option(None, "where the run's artifacts go (default runs/<name>)")
    resume: bool = option(False, "continue a broken run from its last finished step", name="resume_run",
                          flags=("--resume",))
    threads: int | None = option(None, "torch intra-op threads while the job runs (default: 1 when training on the "
                                       "CPU — small models, shared cores; torch's own on a GPU)", check=at_least(1))
    source: ModelOptions = group(ModelOptions, "the source network", model=DEFAULT_MODEL)
    source_training: SourceTraining = group(SourceTraining, "training the source (without --checkpoint)")
    dataset: DataOptions = group(DataOptions, "the data", batch_size=64)
    conversion: ConvertOptions = group(ConvertOptions, "conversion")
    training: FinetuneConfig = group(FinetuneConfig, "fine-tuning (with distillation from the source)", epochs=3)
    export: ExportOptions = group(ExportOptions, "ONNX export")
    latency: Latency = group(Latency, "ONNX latency measurement")
    report: ReportOptions = group(ReportOptions, "the interpretability report")

    def check(self) -> None:
        if self.training.output.out_dir is not None or self.training.output.resume:
            raise OptionError("relu2dlgn run places the fine-tuning files itself: use --out (and --resume), "
                              "not the fine-tuning out_dir/resume options")
        if self.conversion.mode != "dlgn":
            raise OptionError(f"relu2dlgn run converts to a DLGN; mode={self.conversion.mode!r} is not supported "
                              f"here (use relu2dlgn finetune)")

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join("runs", self.name)

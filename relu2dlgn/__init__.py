"""relu2dlgn: convert ReLU networks into deep linearly gated networks (gating graph + value graph), fine-tune them,
export them to ONNX and read them.

The public names are re-exported here; the package is cut by phase: conversion (:mod:`.capture` →
:mod:`.sites` → :mod:`.rewrite` → :mod:`.dlgn` / :mod:`.gates`, :mod:`.convert` the front), fine-tuning
(:mod:`.training`), ONNX export (:mod:`.export`) and the command line (:mod:`.cli`).
"""
from ._version import __version__
from .convert import DEFAULT_BETA, ConvertOptions, convert
from .dlgn import DLGN, DLGNOutput, load
from .errors import (ConversionError, DataError, ExportError, InputError, LoadError, NonFiniteLossError, OptionError,
                     Relu2DlgnError, SpecialisationError)
from .export import ExportReport, export_onnx
from .gates import GateSpec
from .report import ConversionReport, InputSpec
from .sites import GateSite
from .training import FinetuneConfig, FinetuneResult, Trainer, finetune
from .types import GateKind, Mode, Pool, ValueInput

__all__ = [
    "__version__",
    # conversion
    "convert", "ConvertOptions", "DEFAULT_BETA", "DLGN", "DLGNOutput", "load", "GateSite", "GateSpec",
    "ConversionReport", "InputSpec", "GateKind", "Mode", "Pool", "ValueInput",
    # fine-tuning
    "finetune", "Trainer", "FinetuneConfig", "FinetuneResult",
    # export
    "export_onnx", "ExportReport",
    # errors
    "Relu2DlgnError", "ConversionError", "InputError", "SpecialisationError", "OptionError", "LoadError",
    "ExportError", "DataError", "NonFiniteLossError",
]

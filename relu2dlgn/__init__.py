"""relu2dlgn: convert ReLU networks into deep linearly gated networks (gating graph + value graph)."""
from .convert import DEFAULT_BETA, convert
from ._version import __version__
from .dlgn import DLGN, DLGNOutput, load
from .report import ConversionReport
from .export import ExportReport, export_onnx
from .errors import (ConversionError, DataError, ExportError, InputError, LoadError, NonFiniteLossError, OptionError,
                     Relu2DlgnError, SpecialisationError)
from .sites import GateSite
from .train import FinetuneConfig, FinetuneResult, Trainer, finetune

__all__ = [
    "convert", "load", "DLGN", "GateSite", "ConversionReport", "DEFAULT_BETA",
    "export_onnx", "ExportReport", "finetune", "Trainer", "FinetuneConfig", "FinetuneResult", "NonFiniteLossError",
    "Relu2DlgnError", "ConversionError", "InputError", "SpecialisationError", "LoadError", "ExportError",
]

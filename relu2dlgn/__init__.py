"""relu2dlgn: convert ReLU networks into deep linearly gated networks (gating graph + value graph)."""
from .convert import DEFAULT_BETA, convert
from .dlgn import DLGN, ConversionReport
from .export import ExportReport, export_onnx
from .errors import ConversionError, ExportError, InputError, LoadError, Relu2DlgnError, SpecialisationError
from .serialize import load
from .sites import GateSite
from .train import FinetuneConfig, FinetuneResult, NonFiniteLossError, Trainer, finetune

__version__ = "0.1.0"

__all__ = [
    "convert", "load", "DLGN", "GateSite", "ConversionReport", "DEFAULT_BETA",
    "export_onnx", "ExportReport", "finetune", "Trainer", "FinetuneConfig", "FinetuneResult", "NonFiniteLossError",
    "Relu2DlgnError", "ConversionError", "InputError", "SpecialisationError", "LoadError", "ExportError",
]

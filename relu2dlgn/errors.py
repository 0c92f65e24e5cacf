"""Exception types. Every message names what was wrong and where (module path, node, file)."""
from __future__ import annotations


class Relu2DlgnError(Exception):
    """Base class of relu2dlgn's errors."""


class ConversionError(Relu2DlgnError, ValueError):
    """The model cannot be converted as asked: the message names every offending node / module path."""


class InputError(Relu2DlgnError, ValueError):
    """A converted model was called with an input it cannot take (rank, dtype, device)."""


class SpecialisationError(InputError):
    """The graph was specialised on the example input's shape and this input takes another branch."""


class LoadError(Relu2DlgnError, OSError):
    """A saved DLGN cannot be loaded: missing, truncated, corrupted, mismatched or from a newer format."""


class ExportError(Relu2DlgnError, RuntimeError):
    """ONNX export failed or did not reproduce the PyTorch model within tolerance."""

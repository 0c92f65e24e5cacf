"""Every exception type of relu2dlgn. Each message names what was wrong and where (module path, node, file,
option) and, where there is one, the remedy."""
from __future__ import annotations


class Relu2DlgnError(Exception):
    """Base class of relu2dlgn's errors."""


class ConversionError(Relu2DlgnError, ValueError):
    """The model cannot be converted as asked: the message names every offending node / module path."""


class InputError(Relu2DlgnError, ValueError):
    """A converted model (or a training loop) was given an input it cannot take (rank, dtype, device, batch)."""


class SpecialisationError(InputError):
    """The graph was specialised on the example input's shape and this input takes another branch."""


class OptionError(Relu2DlgnError, ValueError):
    """An option (keyword argument, command-line flag or config-file entry) has a value that is not accepted."""


class LoadError(Relu2DlgnError, OSError):
    """A saved DLGN or checkpoint cannot be loaded: missing, truncated, corrupted, mismatched or newer format."""


class ExportError(Relu2DlgnError, RuntimeError):
    """ONNX export failed or did not reproduce the PyTorch model within tolerance."""


class DataError(Relu2DlgnError, ValueError):
    """A dataset cannot be found or read: the message names the dataset, the path and what to do."""


class NonFiniteLossError(Relu2DlgnError, RuntimeError):
    """The loss, the gradient or the model's state became NaN/inf; training stopped before the bad update was
    applied (or before the bad state reached a checkpoint), and the message says what the in-memory model was
    restored to."""


class ExplainError(Relu2DlgnError, ValueError):
    """An interpretability instrument cannot read this model as asked: a plain module where a converted one is
    needed, a DGN where templates must be input-independent, an op whose path weights the NPK cannot set."""

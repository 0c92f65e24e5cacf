"""The public API is pinned: what ``relu2dlgn`` exports and the signatures of its main entry points. A change
here is an API change and must be made on purpose (update the README and this test together)."""
from __future__ import annotations

import dataclasses
import inspect

import relu2dlgn
from relu2dlgn.convert import ConvertOptions

PUBLIC = [
    "__version__",
    "convert", "ConvertOptions", "DEFAULT_BETA", "DLGN", "DLGNOutput", "load", "GateSite", "GateSpec",
    "ConversionReport", "InputSpec", "GateKind", "Mode", "Pool", "ValueInput",
    "finetune", "Trainer", "FinetuneConfig", "FinetuneResult",
    "export_onnx", "ExportReport",
    "Relu2DlgnError", "ConversionError", "InputError", "SpecialisationError", "OptionError", "LoadError",
    "ExportError", "DataError", "NonFiniteLossError",
]

SIGNATURES = {
    "convert": "(model: 'nn.Module', mode: 'Mode' = 'dlgn', *, example_inputs: 'torch.Tensor | "
               "Sequence[torch.Tensor] | None' = None, value_input: 'ValueInput' = 'input', beta: 'float' = 10.0, "
               "pool: 'Pool' = 'gate', strict: 'bool' = True, leaf_modules: 'Iterable[type | str]' = (), verify: 'bool' = "
               "True) -> 'DLGN'",
    "finetune": "(dlgn: 'DLGN', train_loader: 'Iterable', val_loader: 'Iterable | None' = None, *, teacher: "
                "'nn.Module | Teacher | None' = None, epochs: 'int' = 5, config: 'FinetuneConfig | None' = None, "
                "example_inputs: 'Sequence[torch.Tensor] | None' = None, leaf_modules: 'Iterable[type | str] | None' = "
                "None, **options: 'Any') -> 'FinetuneResult'",
    "export_onnx": "(dlgn: 'DLGN', path: 'str | os.PathLike', example_inputs: 'torch.Tensor | "
                   "Sequence[torch.Tensor]', *, dynamic_batch: 'bool' = True, opset: 'int | None' = None, split: "
                   "'bool' = False, gates_output: 'bool' = False, portable: 'bool' = False, dtype: 'torch.dtype | "
                   "ExportDType | None' = None, verify: 'bool' = True, verify_batch: 'int | None' = None, rtol: "
                   "'float | None' = None, gate_tol: 'float | None' = None, custom_translations: "
                   "'dict[Callable, Callable] | None' = None, seed: 'int' = 0) -> 'ExportReport'",
    "load": "(path: 'str | os.PathLike', map_location: 'str | torch.device' = 'cpu') -> 'DLGN'",
}


def test_all_is_pinned_and_importable():
    assert relu2dlgn.__all__ == PUBLIC
    for name in PUBLIC:
        assert hasattr(relu2dlgn, name), name


def test_entry_point_signatures():
    for name, text in SIGNATURES.items():
        assert str(inspect.signature(getattr(relu2dlgn, name))) == text, name
    assert str(inspect.signature(relu2dlgn.DLGN.run)) == \
        "(self, *inputs: 'Any', hard: 'bool | None' = None, beta: 'float | torch.Tensor | None' = None) -> 'DLGNOutput'"
    assert [f.name for f in dataclasses.fields(relu2dlgn.DLGNOutput)] == ["output", "pre_activations", "gates"]


def test_convert_options_mirror_convert_defaults():
    """ConvertOptions (the CLI's and config files' conversion options) has convert()'s names and defaults."""
    params = inspect.signature(relu2dlgn.convert).parameters
    for f in dataclasses.fields(ConvertOptions):
        assert params[f.name].default == f.default, f.name


def test_every_error_is_a_relu2dlgn_error():
    for name in PUBLIC:
        obj = getattr(relu2dlgn, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, relu2dlgn.Relu2DlgnError), name

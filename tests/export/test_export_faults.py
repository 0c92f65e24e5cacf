"""Export under unusual models and options (issue 10): float16 models verify with tolerances of their dtype
(item 9); an opset the exporter cannot write is refused naming the range, and the requested one is what is
written (item 10)."""
from __future__ import annotations

import onnx
import pytest
import torch

import relu2dlgn
from _models import TinyNet, randomize_bn
from helpers import run_cli
from relu2dlgn.errors import ExportError, OptionError
from relu2dlgn.export import DEFAULT_RTOL, default_tolerances, export_onnx
from relu2dlgn.export import torch_export


def _dlgn(dtype=torch.float32):
    torch.manual_seed(0)
    return relu2dlgn.convert(randomize_bn(TinyNet()).eval().to(dtype),
                             example_inputs=(torch.randn(1, 3, 16, 16, dtype=dtype),)).eval()


def test_tolerances_follow_the_dtype():
    assert default_tolerances(torch.float32) == (DEFAULT_RTOL, DEFAULT_RTOL) == default_tolerances(torch.float64)
    rtol16, gate16 = default_tolerances(torch.float16)
    assert rtol16 >= 5 * torch.finfo(torch.float16).eps and gate16 >= 5 * torch.finfo(torch.float16).eps
    assert default_tolerances(torch.bfloat16)[0] > rtol16


def test_a_float16_dlgn_exports_and_verifies(tmp_path):
    """Item 9: the default tolerance (1e-4 of max|y|) was below float16's resolution, so every float16 export
    failed verification although the file was right."""
    dlgn = _dlgn(torch.float16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float16)
    report = export_onnx(dlgn, tmp_path / "m.onnx", x)
    v = report.verification
    assert v.ok and (v.rtol, v.gate_tol) == default_tolerances(torch.float16)
    assert v.max_abs <= v.rtol * v.scale
    with pytest.raises(ExportError, match="does not reproduce"):             # explicit tolerances still rule
        export_onnx(dlgn, tmp_path / "strict.onnx", x, rtol=1e-6)
    assert not (tmp_path / "strict.onnx").exists()


@pytest.mark.parametrize("opset", [7, 17, 1000])
def test_an_opset_the_exporter_cannot_write_is_refused(tmp_path, opset):
    """Item 10: ``opset=7`` used to write opset 18 and succeed."""
    with pytest.raises(OptionError, match=rf"opset={opset}.*opsets 18 to \d\d"):
        export_onnx(_dlgn(), tmp_path / "m.onnx", torch.randn(2, 3, 16, 16), opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_opset_7_is_refused_with_exit_code_2(tmp_path, capsys):
    saved = tmp_path / "saved"
    _dlgn().save(saved)
    assert run_cli(["export", str(saved), "--out", str(tmp_path / "m.onnx"), "--opset", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relu2dlgn export: error: OptionError: opset=7") and "18 to" in err and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_the_requested_opset_is_written_or_the_export_fails(tmp_path, monkeypatch):
    """Item 10: whatever the exporter does, the file has the requested opset (a converter that silently keeps
    another one is caught)."""
    x = torch.randn(2, 3, 16, 16)
    export_onnx(_dlgn(), tmp_path / "m.onnx", x, opset=19, verify=False)
    assert [o.version for o in onnx.load(tmp_path / "m.onnx").opset_import if o.domain in ("", "ai.onnx")] == [19]
    real = torch.onnx.export

    def keeps_18(*args, **kwargs):                                   # what torch.onnx does when conversion fails
        return real(*args, **{**kwargs, "opset_version": 18})

    monkeypatch.setattr(torch_export.torch.onnx, "export", keeps_18)
    with pytest.raises(ExportError, match="opset 19 was asked for.*wrote opset 18"):
        export_onnx(_dlgn(), tmp_path / "n.onnx", x, opset=19, verify=False)
    assert not (tmp_path / "n.onnx").exists()

"""The command line: inspect prints the site table; errors are one clear line and exit code 2."""
from __future__ import annotations

import subprocess
import sys

from helpers import run_cli as main


def test_inspect_timm_resnet18(capsys):
    assert main(["inspect", "timm:resnet18", "--input-size", "3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "18 gate sites: relu=17, maxpool=1" in out
    assert "layer4.1.act2" in out and "1x512x2x2" in out and "1x64x16x16" in out  # maxpool output shape
    assert out.count("[in-place]") == 17


def test_inspect_reports_refused_and_kept(capsys):
    assert main(["inspect", "timm:seresnet18", "--input-size", "3,32,32"]) == 2
    err = capsys.readouterr().err
    assert "ConversionError" in err and "layer1.0.se.gate" in err
    assert main(["inspect", "timm:seresnet18", "--input-size", "3,32,32", "--no-strict"]) == 0
    out = capsys.readouterr().out
    assert "kept nonlinearities (not gates):" in out and out.count("Tensor.sigmoid") == 8


def test_inspect_torchvision_dgn(capsys):
    assert main(["inspect", "tv:vgg11", "--mode", "dgn", "--input-size", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "15 gate sites: relu=10, maxpool=5" in out


def test_console_script_unknown_model():
    r = subprocess.run([sys.executable, "-m", "relu2dlgn.cli", "inspect", "timm:not_a_model"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "timm has no model 'not_a_model'" in r.stderr

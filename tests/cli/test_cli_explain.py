"""relu2dlgn explain on a finetune-style run directory (model/ + config.yaml, source rebuilt from its checkpoint)
and on a bare saved model; errors are one line and exit code 2."""
from __future__ import annotations

import json
import os

import torch
import yaml
from safetensors.torch import save_file

import relu2dlgn
from _models import TinyNet, randomize_bn
from helpers import run_cli as main

FILES = {"gates.png", "npk.png", "similarity.png", "report.json", "report.md"}


def test_explain_run_directory(tmp_path, capsys):
    torch.manual_seed(0)
    src = randomize_bn(TinyNet(num_classes=10, in_chans=1)).eval()
    save_file(src.state_dict(), str(tmp_path / "src.safetensors"))
    dlgn = relu2dlgn.convert(src, example_inputs=torch.randn(2, 1, 16, 16))
    run = tmp_path / "run"
    dlgn.save(run / "model")
    config = {"source": {"model": "_models:TinyNet", "checkpoint": str(tmp_path / "src.safetensors")},
              "dataset": {"data": "digits", "image_size": 16, "channels": 1, "batch_size": 64}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    argv = ["explain", str(run), "--npk-examples", "8", "--similarity-examples", "40", "--max-batches", "2",
            "--no-progress"]
    assert main(argv) == 0  # the run's 1-channel, 16-pixel data options: a 3-channel batch would not fit
    out = run / "explain"
    assert FILES <= set(os.listdir(out))
    numbers = json.loads((out / "report.json").read_text())
    agreement = numbers["agreement"]
    assert agreement["sites"][0]["agreement"] == 1.0 and 0 < agreement["overall"] < 1  # same first pre-activation
    assert set(numbers["similarity"]) == {"DLGN", "source"}
    assert "agreement with the source's gates" in capsys.readouterr().out


def test_explain_saved_model_and_errors(tmp_path, capsys):
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=torch.randn(2, 3, 16, 16))
    dlgn.save(tmp_path / "m")
    assert main(["explain", str(tmp_path / "m"), "--out", str(tmp_path / "r"), "--npk-examples", "6",
                 "--similarity-examples", "0", "--template-sites", "0,2", "--max-batches", "1", "--no-progress"]) == 0
    assert {"gates.png", "npk.png", "templates_site0.png", "templates_site2.png"} <= set(os.listdir(tmp_path / "r"))
    assert "agreement" not in json.loads((tmp_path / "r" / "report.json").read_text())
    assert main(["explain", str(tmp_path / "nothing")]) == 2
    assert "neither a saved DLGN" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "m"), "--template-sites", "0,x", "--no-progress"]) == 2
    assert "template_sites" in capsys.readouterr().err

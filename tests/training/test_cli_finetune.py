"""relu2dlgn finetune: convert + fine-tune from the command line, resume, --config and the resolved config."""
from __future__ import annotations

import json

import torch
import yaml

import relu2dlgn
from _models import source_net
from helpers import comparable, run_cli


def _metrics(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_cli_finetune_digits_distill_resume(tmp_path, capsys):
    from safetensors.torch import save_file
    ckpt = tmp_path / "src.safetensors"
    save_file(source_net().state_dict(), str(ckpt))
    out = tmp_path / "run"
    common = ["finetune", "_models:TinyNet", "--checkpoint", str(ckpt), "--data", "digits", "--image-size", "12",
              "--batch-size", "256", "--out", str(out), "--no-progress"]
    assert run_cli(common + ["--epochs", "1", "--distill"]) == 0
    assert run_cli(common + ["--epochs", "2", "--distill", "--resume"]) == 0
    lines = _metrics(out)
    assert [r["epoch"] for r in lines] == [0, 1, 2] and "val_gate_agreement" in lines[-1]
    assert "relu2dlgn finetune: 2 epoch(s)" in capsys.readouterr().out      # the summary line
    dlgn = relu2dlgn.load(out / "model")
    assert dlgn.mode == "dlgn" and len(dlgn.sites) == 3
    scratch = tmp_path / "scratch"
    assert run_cli(["finetune", "_models:TinyNet", "--data", "digits", "--image-size", "12", "--channels", "1",
                    "--batch-size", "256",
                    "--epochs", "1", "--from-scratch", "--freeze-gating", "--value-input", "ones", "--pool", "avg",
                    "--out", str(scratch), "--no-progress"]) == 0
    assert relu2dlgn.load(scratch / "model").value_input == "ones"
    capsys.readouterr()
    assert run_cli(["finetune", "_models:TinyNet", "--data", "digits", "--distill", "--out", str(scratch)]) == 2
    assert "OptionError: --distill needs --checkpoint" in capsys.readouterr().err


def test_resolved_config_repeats_the_run(tmp_path):
    """The run writes OUT/config.yaml with every option resolved; --config of that file (to another --out)
    repeats the run: the same per-epoch metrics and bit-identical weights."""
    first = tmp_path / "first"
    assert run_cli(["finetune", "_models:TinyNet", "--data", "digits", "--image-size", "12", "--batch-size", "128",
                    "--epochs", "1", "--lr", "3e-3", "--beta-schedule", "linear", "--no-progress",
                    "--out", str(first)]) == 0
    cfg = yaml.safe_load(open(first / "config.yaml"))
    assert cfg["source"]["model"] == "_models:TinyNet" and cfg["training"]["optim"]["lr"] == 3e-3
    assert cfg["training"]["gates"]["beta_schedule"] == "linear" and cfg["dataset"]["image_size"] == 12
    assert cfg["training"]["output"]["out_dir"] == str(first)
    again = tmp_path / "again"
    assert run_cli(["finetune", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    assert comparable(_metrics(again)) == comparable(_metrics(first))
    a, b = relu2dlgn.load(first / "model").state_dict(), relu2dlgn.load(again / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again_cfg = yaml.safe_load(open(again / "config.yaml"))
    again_cfg["training"]["output"]["out_dir"] = str(first)
    assert again_cfg == cfg


def test_config_file_toml_and_flag_precedence(tmp_path, capsys):
    """A TOML file sets options by section or by leaf name; a flag on the command line overrides it; unknown
    keys and bad values are one-line errors naming the key and the file."""
    toml = tmp_path / "run.toml"
    toml.write_text('model = "_models:TinyNet"\nepochs = 1\n[dataset]\nimage_size = 12\nbatch_size = 256\n'
                    '[training.optim]\nlr = 0.5\n')
    out = tmp_path / "o"
    assert run_cli(["finetune", "--config", str(toml), "--lr", "2e-3", "--no-progress", "--out", str(out)]) == 0
    cfg = yaml.safe_load(open(out / "config.yaml"))
    assert cfg["training"]["optim"]["lr"] == 2e-3 and cfg["training"]["epochs"] == 1
    assert cfg["dataset"]["batch_size"] == 256
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "_models:TinyNet"\nlearning_rate = 1\n')
    capsys.readouterr()
    assert run_cli(["finetune", "--config", str(bad), "--out", str(out)]) == 2
    assert "unknown option 'learning_rate' in " + str(bad) in capsys.readouterr().err
    bad.write_text('model = "_models:TinyNet"\n[training.optim]\nlr = -1\n')
    assert run_cli(["finetune", "--config", str(bad), "--out", str(out)]) == 2
    assert f"option lr=-1.0 (in {bad}): must be a finite number > 0" in capsys.readouterr().err

"""Bad command lines (issue 10, item 11): every command answers a bad shape, a bad model spec, a corrupt or
mismatched checkpoint with one line on stderr naming what is wrong, and exit code 2 — never a traceback."""
from __future__ import annotations

import pytest
import torch

import relu2dlgn
from _models import TinyNet
from helpers import run_cli

DIGITS = ["--data", "digits", "--image-size", "8", "--batch-size", "512", "--no-progress", "--epochs", "1",
          "--recalibrate-bn", "0"]


def _one_error_line(capsys, command: str, kind: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"relu2dlgn {command}: error: {kind}:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Source-model weight files: garbage .safetensors / .pt, and a 3-class TinyNet's weights (another shape)."""
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("ckpt")
    (d / "garbage.safetensors").write_bytes(b"garbage" * 8)
    (d / "garbage.pt").write_bytes(b"garbage" * 8)
    save_file(TinyNet(num_classes=3).state_dict(), str(d / "three.safetensors"))
    torch.save(TinyNet(num_classes=3).state_dict(), d / "three.pt")
    torch.save({"a": [1, 2]}, d / "not_weights.pt")
    return d


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pt", "three.safetensors", "three.pt",
                                  "not_weights.pt", "missing.pt"])
@pytest.mark.parametrize("command", ["inspect", "finetune"])
def test_a_corrupt_or_mismatched_checkpoint_is_a_load_error_naming_the_file(checkpoints, tmp_path, capsys, name,
                                                                           command):
    args = [command, "_models:TinyNet", "--checkpoint", str(checkpoints / name)]
    if command == "finetune":
        args += DIGITS + ["--out", str(tmp_path / "run")]
    assert run_cli(args) == 2
    err = _one_error_line(capsys, command, "LoadError", name)
    if name.startswith("three"):
        assert "fc.weight" in err and "(3, 16)" in err and "(10, 16)" in err


@pytest.mark.parametrize("spec", [":", "timm:", ":TinyNet", "_models:", "no_such_module_xyz:f", "_models:nothing",
                                  "TinyNet", "_models:randomize_bn"])
@pytest.mark.parametrize("command", ["inspect", "finetune"])
def test_a_bad_model_spec_is_an_option_error_naming_it(tmp_path, capsys, spec, command):
    args = [command, spec] + (DIGITS + ["--out", str(tmp_path / "run")] if command == "finetune" else [])
    assert run_cli(args) == 2
    _one_error_line(capsys, command, "OptionError", repr(spec))


@pytest.mark.parametrize("size", ["3,32", "3,32,32,32", "1,32,32"])
def test_inspect_with_an_input_size_the_model_cannot_take(capsys, size):
    assert run_cli(["inspect", "_models:TinyNet", "--input-size", size]) == 2
    _one_error_line(capsys, "inspect", "InputError", "--input-size", size.replace(",", ", "))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "m"
    relu2dlgn.convert(TinyNet().eval(), example_inputs=(torch.randn(1, 3, 16, 16),)).save(path)
    return path


@pytest.mark.parametrize("size", ["3,32", "3,32,32,32", "1,16,16"])
def test_export_with_an_input_size_the_model_cannot_take(saved, tmp_path, capsys, size):
    assert run_cli(["export", str(saved), "--out", str(tmp_path / "m.onnx"), "--input-size", size]) == 2
    _one_error_line(capsys, "export", "InputError", f"--input-size {size}")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("command", ["inspect", "export", "finetune"])
def test_zero_sizes_are_refused_from_flags_and_from_config_files(saved, tmp_path, capsys, command):
    base = {"inspect": ["inspect", "_models:TinyNet"],
            "export": ["export", str(saved), "--out", str(tmp_path / "m.onnx")],
            "finetune": ["finetune", "_models:TinyNet", "--out", str(tmp_path / "run")] + DIGITS}[command]
    if command != "finetune":
        with pytest.raises(SystemExit) as info:                     # argparse's own usage error: exit code 2
            run_cli(base + ["--input-size", "0,0,0"])
        assert info.value.code == 2 and "positive sizes" in capsys.readouterr().err
        key, value = "input_size", "[0, 0, 0]"
    else:
        key, value = "image_size", "0"
    config = tmp_path / "c.yaml"
    config.write_text(f"{key}: {value}\n")
    assert run_cli(base + ["--config", str(config)]) == 2
    _one_error_line(capsys, command, "OptionError", key, "c.yaml")


def test_export_of_a_damaged_save_is_a_load_error(saved, tmp_path, capsys):
    import shutil
    damaged = tmp_path / "damaged"
    shutil.copytree(saved, damaged)
    (damaged / "graphs.pt").write_bytes(b"garbage")
    assert run_cli(["export", str(damaged), "--out", str(tmp_path / "m.onnx")]) == 2
    _one_error_line(capsys, "export", "LoadError", "graphs.pt")

"""Every script in examples/ runs, with tiny settings, and computes what it says."""
from __future__ import annotations

import importlib.util
import os


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {"convert_resnet", "finetune_own_data", "export_and_serve", "custom_module", "read_with_explain"}
    present = {f[:-3] for f in os.listdir(EXAMPLES) if f.endswith(".py")}
    assert present <= tested, present - tested


def test_convert_resnet(tmp_path):
    r = _load("convert_resnet").main(["--size", "32", "--out", str(tmp_path / "m")])
    assert r["sites"] == 18 and r["dgn_error"] == 0.0


def test_finetune_own_data(tmp_path):
    r = _load("finetune_own_data").main(["--model", "_models:TinyNet", "--size", "12", "--n", "256", "--epochs", "2",
                                         "--out", str(tmp_path / "ft")])
    assert 0.0 <= r["val_acc"] <= 1.0 and 0.5 < r["agreement"] <= 1.0
    assert (tmp_path / "ft" / "model" / "config.json").exists()


def test_export_and_serve(tmp_path):
    r = _load("export_and_serve").main(["--model", "_models:TinyNet", "--size", "16", "--out", str(tmp_path / "m.onnx")])
    assert r["max_error"] <= 1e-4 * r["scale"]


def test_custom_module():
    r = _load("custom_module").main(["--size", "16"])
    assert r["kinds"] == {"relu": 3, "maxpool": 1, "leaky_relu": 1} and r["dgn_error"] == 0.0


def test_read_with_explain(tmp_path):
    r = _load("read_with_explain").main(["--model", "_models:TinyNet", "--size", "12", "--epochs", "1",
                                         "--examples", "16", "--out", str(tmp_path / "report")])
    assert 0 < r["on_fraction"] < 1 and 0.5 < r["agreement"] <= 1 and -1 <= r["alignment"] <= 1
    assert (tmp_path / "report" / "report.md").exists() and len(r["figures"]) >= 4

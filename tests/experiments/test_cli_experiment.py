"""relu2dlgn experiment: NAME and all on a run directory (its source, data options and fine-tuned DLGN are read),
the summary table, --quick, and the data sets users bring (generated CIFAR-10 batches, an image folder)."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import TINY
from helpers import run_cli
from relu2dlgn import experiments as E
from relu2dlgn.errors import OptionError
from relu2dlgn.experiments import EXPERIMENTS
from relu2dlgn.experiments.runs import finetuned
from test_data import _pngs, _write_cifar


def _run_dir(setup, path) -> str:
    """A directory like `relu2dlgn finetune` leaves: config.yaml (source, data) and the fine-tuned model/."""
    os.makedirs(path)
    cfg = {"source": {"model": "_models:TinyNet", "checkpoint": setup.source_record()["weights"]},
           "dataset": {"data": "digits", "image_size": 12, "batch_size": 96}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    finetuned(setup, setup.cfg.seed_list()[0]).model.save(path / "model")
    return str(path)


def test_all_on_a_run_directory_writes_the_summary(setup, tmp_path, capsys):
    run = _run_dir(setup, tmp_path / "run")
    out = tmp_path / "all"
    assert run_cli(["experiment", "all", run, "--quick", "--out", str(out), "--threads", "1", "--no-progress",
                    "--recalibrate-bn", "1", "--npk-examples", "8"]) == 0
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| experiment")]
    assert [r.split(" | ")[0][2:] for r in rows[:6]] == list(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert name in printed and (out / f"{name}.png").exists() and (out / f"{name}.json").exists()
    data = json.load(open(out / "summary.json"))
    assert data["budget"] == {"seeds": 1, "epochs": 1, "quick": True}
    assert data["source"]["trained_here"] is False                     # the run's source weights were read
    shuffle = json.load(open(out / "shuffle_gates.json"))
    assert "the run's fine-tuned DLGN" in shuffle["protocol"]["models"]
    assert "12px" in shuffle["protocol"]["data"] and "batch 96" in shuffle["protocol"]["training"]  # run's data


def test_one_experiment_with_an_explicit_data_option_over_the_runs(setup, tmp_path, capsys):
    run = _run_dir(setup, tmp_path / "run")
    out = tmp_path / "one"
    assert run_cli(["experiment", "fixed_gates", run, "--quick", "--out", str(out), "--threads", "1",
                    "--no-progress", "--recalibrate-bn", "1", "--batch-size", "64"]) == 0
    assert "## `fixed_gates`" in capsys.readouterr().out
    saved = json.load(open(out / "fixed_gates.json"))
    assert "batch 64" in saved["protocol"]["training"] and "the run's fine-tuned DLGN" in saved["protocol"]["learnt DLGN"]


def test_refuses_what_the_experiments_set_themselves():
    with pytest.raises(OptionError, match="set these themselves"):
        E.fixed_gates(freeze_gating=True)
    assert run_cli(["experiment", "fixed_gates", "/nonexistent/run", "--quick"]) == 2


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


def test_every_experiment_runs_on_generated_cifar10(tmp_path, no_md5):
    _write_cifar(str(tmp_path / "cifar"), hundred=False)
    results = E.run_all(data="cifar10", data_root=str(tmp_path / "cifar"), quick=True,
                        out=str(tmp_path / "out"), **{**TINY, "npk_examples": 6})
    assert [r.name for r in results] == list(EXPERIMENTS)
    assert "cifar10" in results[0].protocol["data"]


def test_an_experiment_runs_on_an_image_folder(tmp_path):
    _pngs(tmp_path / "images" / "train", n=6)
    _pngs(tmp_path / "images" / "val", n=2)
    result = E.dlgn_vs_dnn(data=f"imagefolder:{tmp_path / 'images'}", out=str(tmp_path / "out"), quick=True, **TINY)
    assert result.protocol["data"].startswith("imagefolder:") and len(result.rows) == 4


def test_a_main_job_run_directory_gives_the_source_it_trained(tmp_path):
    """`relu2dlgn run` records no checkpoint: the source weights are the ones its source step wrote."""
    from relu2dlgn.errors import LoadError
    from relu2dlgn.experiments.source import resolve_source
    run = tmp_path / "run"
    (run / "source" / "model").mkdir(parents=True)
    (run / "source" / "model" / "model.safetensors").write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump({"source": {"model": "timm:resnet10t", "checkpoint": None},
                                                     "dataset": {"data": "digits", "batch_size": 64}}))
    spec = resolve_source(str(run))
    assert spec.model == "timm:resnet10t" and spec.weights == str(run / "source" / "model" / "model.safetensors")
    assert spec.dlgn_dir is None and spec.dataset == {"data": "digits", "batch_size": 64}
    with pytest.raises(LoadError, match="not a relu2dlgn run"):
        resolve_source(str(tmp_path))

"""relu2dlgn run: the whole pipeline with tiny settings, its files, the closing table, and --resume."""
from __future__ import annotations

import json
import os

import pytest
import yaml

import relu2dlgn
from helpers import run_cli
from relu2dlgn.errors import OptionError
from relu2dlgn.pipeline import RunConfig, run
from relu2dlgn.pipeline import runner
from relu2dlgn.pipeline import steps as S
from relu2dlgn.options import from_flat
from relu2dlgn.utils.threads import torch_threads

TINY = dict(model="_models:TinyNet", image_size=12, batch_size=128, source_epochs=1, epochs=1, latency_runs=2,
            latency_batch=4, progress=False, recalibrate_bn=2, npk_examples=8, similarity_examples=20,
            max_batches=1)


def test_main_command_from_another_directory_writes_everything_under_out(tmp_path, monkeypatch, capsys):
    """`relu2dlgn run --out DIR` run from any directory writes every artifact under DIR and prints the closing
    table; the fine-tuned model, the ONNX files and the metrics are real (loadable, verified, one line/epoch)."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--model", "_models:TinyNet", "--image-size", "12", "--batch-size", "128",
            "--source-epochs", "1", "--epochs", "1", "--latency-runs", "2", "--latency-batch", "4", "--no-progress",
            "--recalibrate-bn", "2", "--npk-examples", "8", "--similarity-examples", "20"]
    assert run_cli(argv) == 0
    table = capsys.readouterr().out
    for row in ("source network accuracy", "DLGN accuracy right after conversion", "DLGN accuracy after fine-tuning",
                "gate agreement with the source", "ONNX parity", "ONNX latency vs the source's ONNX",
                "interpretability report", "resolved config"):
        assert row in table, row
    assert os.listdir(elsewhere) == []
    names = set(os.listdir(out))
    assert {"config.yaml", "run.json", "metrics.jsonl", "model", "checkpoints", "source", "dlgn.onnx",
            "source.onnx", "report"} <= names
    state = json.load(open(out / "run.json"))["steps"]
    assert list(state) == ["source", "convert", "finetune", "export", "report"]
    assert os.path.exists(out / "report" / "report.md") and all(os.path.exists(f) for f in state["report"]["figures"])
    assert state["report"]["agreement"] is not None                    # the source was rebuilt for agreement
    assert state["export"]["verified"] and state["export"]["latency_ratio"] > 0
    dlgn = relu2dlgn.load(out / "model")
    assert dlgn.mode == "dlgn" and len(dlgn.sites) == state["convert"]["sites"] == 3
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == [0, 1]
    cfg = yaml.safe_load(open(out / "config.yaml"))
    assert cfg["source"]["model"] == "_models:TinyNet" and cfg["out"] == str(out) and cfg["resume"] is False
    # each step on its own with the other commands: explain reads the run (and finds the source it trained)
    # on the run's one torch thread: oneDNN's convolutions round differently on two threads, which can flip a gate
    # whose pre-activation is within rounding of 0
    with torch_threads(1):
        assert run_cli(["explain", str(out), "--out", str(tmp_path / "again"), "--npk-examples", "8",
                        "--similarity-examples", "20", "--no-progress"]) == 0
    again = json.load(open(tmp_path / "again" / "report.json"))
    assert again["agreement"]["overall"] == pytest.approx(state["report"]["agreement"])


def test_resume_continues_from_the_last_finished_step(tmp_path, monkeypatch):
    """A run broken during fine-tuning, resumed, does not repeat the finished steps and ends complete."""
    out = str(tmp_path / "run")
    cfg = from_flat(RunConfig, out=out, **TINY)
    calls = []

    def broken(ctx):
        raise KeyboardInterrupt("killed during fine-tuning")

    steps = list(S.STEPS)
    monkeypatch.setattr(runner, "STEPS", [(n, broken if n == "finetune" else f) for n, f in steps])
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert list(json.load(open(os.path.join(out, "run.json")))["steps"]) == ["source", "convert"]

    def counting(name, fn):
        def step(ctx):
            calls.append(name)
            return fn(ctx)
        return step

    monkeypatch.setattr(runner, "STEPS", [(n, counting(n, f)) for n, f in steps])
    result = run(from_flat(RunConfig, cfg, resume_run=True))
    assert calls == ["finetune", "export", "report"]
    assert list(result.steps) == ["source", "convert", "finetune", "export", "report"]
    with pytest.raises(OptionError, match=r"--resume: the options differ .* \(in training\)"):
        run(from_flat(RunConfig, cfg, resume_run=True, epochs=2))


def test_run_refuses_options_it_places_itself():
    with pytest.raises(OptionError, match="places the fine-tuning files itself"):
        from_flat(RunConfig, out_dir="x")


def test_the_job_trains_on_one_cpu_thread_unless_told_and_restores_torch_s_count(tmp_path, monkeypatch):
    import torch
    seen = []
    monkeypatch.setattr(runner, "STEPS", [("source", lambda ctx: seen.append(torch.get_num_threads()) or {})])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(from_flat(RunConfig, out=str(tmp_path / "a"), device="cpu", **TINY))
        assert torch.get_num_threads() == 2
        run(from_flat(RunConfig, out=str(tmp_path / "b"), device="cpu", threads=3, **TINY))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 3]

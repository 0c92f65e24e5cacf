"""benchmarks/run_all.py: the quick budget runs the scripts, and the summary (JSON, Markdown, README table)
carries each script's own figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ALL = os.path.join(ROOT, "benchmarks", "run_all.py")


def test_run_all_quick_writes_the_summary_and_the_readme_table(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, RUN_ALL, "--quick", "--only", "eval", "onnx", "--results", str(results)],
                   check=True, env=env, capture_output=True, text=True)
    summary = json.loads((results / "summary.json").read_text())
    eval_json = json.loads((results / "eval.json").read_text())
    onnx_json = json.loads((results / "onnx.json").read_text())
    assert summary["cpu"] and summary["torch"] and summary["date"]
    ratios = [r[3] for r in summary["rows"]]
    assert ratios == [f"{r['ratio']:.2f}x" for r in eval_json["results"]] + \
        [f"{v:.2f}x" for r in onnx_json["results"] for v in r["ratio"].values()]
    assert all(1.0 < float(x[:-1]) < 10.0 for x in ratios)     # two copies of the network: above the source
    md = (results / "summary.md").read_text()
    assert summary["cpu"] in md and md.count("\n|") == len(summary["rows"]) + 2  # header, rule, rows

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- benchmarks:begin -->\nold\n<!-- benchmarks:end -->\n\nafter\n")
    subprocess.run([sys.executable, RUN_ALL, "--summarize", "--results", str(results), "--readme", str(readme)],
                   check=True, env=env, capture_output=True, text=True)
    text = readme.read_text()
    assert "old" not in text and summary["markdown"] in text and text.endswith("\n\nafter\n")


def test_readme_without_markers_is_refused_and_left_as_it_was(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    (tmp_path / "results").mkdir()
    res = subprocess.run([sys.executable, RUN_ALL, "--summarize", "--results", str(tmp_path / "results"),
                          "--readme", str(readme)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode != 0 and "benchmarks:begin" in res.stderr
    assert readme.read_text() == "no markers\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))

"""Run the benchmark scripts and write one summary: ``benchmarks/results/summary.json`` and ``summary.md``.

    python benchmarks/run_all.py                 # all of them (about 15 minutes on a 2-core CPU)
    python benchmarks/run_all.py --only eval onnx
    python benchmarks/run_all.py --summarize     # rebuild the summary from the JSON files already there
    python benchmarks/run_all.py --summarize --readme README.md   # and put its table into the README

Each benchmark runs in its own process (its thread settings and memory are its own) and writes its JSON file
into ``--results``; every figure in the summary is a ratio measured side by side in one run (source and DLGN
interleaved), or a time, with the machine (CPU model, cores), the torch version and the date written above
the table. Rows:

* conversion time — ``convert.py``: ``relu2dlgn.convert`` of timm resnet50, without and with the numeric proof;
* training step — ``train_step.py``: a DLGN training step / the source's (timm resnet18, 64 px, batch 32), plain,
  with distillation, the whole Trainer step, compiled (inductor), and the peak memory of training;
* eval (PyTorch) — ``eval_latency.py``: ``dlgn(x)`` / ``model(x)`` in eval mode (timm resnet18/50, 224 px);
* eval (onnxruntime) — ``onnx_latency.py``: the exported DLGN / the source's export (one intra-op thread and
  onnxruntime's default);
* accuracy retention — ``accuracy_retention.py``: the digits validation accuracy of the trained source, of the
  DLGN right after conversion and after fine-tuning with distillation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

from common import write_json  # noqa: E402  (this directory is on sys.path when the script runs)

from relu2dlgn.utils.fs import atomic_write_text
from relu2dlgn.utils.machine import cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))

BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "convert": ("convert.py", ["--models", "resnet50", "--repeats", "3"]),
    "train_step": ("train_step.py", ["--models", "timm:resnet18", "--size", "64", "--batch", "32", "--threads", "1",
                                     "--compile", "--memory"]),
    "eval": ("eval_latency.py", ["--threads", "1"]),
    "onnx": ("onnx_latency.py", ["--threads", "1", "0"]),
    "accuracy": ("accuracy_retention.py", ["--only", "distill", "--threads", "1"]),
}
QUICK: dict[str, list[str]] = {  # a smoke budget: the same rows, numbers that say little
    "convert": ["--models", "resnet18", "--repeats", "1"],
    "train_step": ["--models", "timm:resnet10t", "--size", "32", "--batch", "8", "--threads", "1", "--steps", "1",
                   "--repeats", "1", "--warmup", "1"],
    "eval": ["--models", "timm:resnet10t", "--size", "32", "--batches", "1", "--repeats", "2", "--threads", "1"],
    "onnx": ["--models", "timm:resnet10t", "--size", "32", "--batches", "1", "--repeats", "2", "--threads", "1"],
    "accuracy": ["--model", "timm:resnet10t", "--source-epochs", "1", "--epochs", "1", "--only", "distill",
                 "--threads", "1"],
}


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` prints) and its logical core count."""
    return f"{cpu_name()}, {os.cpu_count()} logical cores"


def run_benchmark(name: str, results: str, quick: bool) -> float:
    script, args = BENCHMARKS[name]
    args = QUICK[name] if quick else args
    out = os.path.join(results, f"{name}.json")
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--out", out]
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
    tick = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - tick


def _load(results: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _x(v: float) -> str:
    return f"{v:.2f}x"


def rows_convert(d: dict[str, Any]) -> list[list[str]]:
    return [[f"conversion time, {r['model']} ({r['sites']} gate sites)", "`convert(model)` without / with the numeric "
             "proof", f"{r['dlgn_s']:.2f} s / {r['dlgn_verify_total_s']:.2f} s",
             f"proof {r['dlgn_verify_share']:.0%} of conversion", "convert ≤ 0.3 s; proof ≤ 25 %"]
            for r in d["results"]]


def rows_train(d: dict[str, Any]) -> list[list[str]]:
    rows = []
    labels = {"dlgn": "DLGN step", "dlgn pool=avg": "DLGN step, pool=\"avg\"", "dlgn + distill": "distillation step",
              "Trainer": "Trainer step", "Trainer (distill)": "Trainer step, distillation",
              "Trainer (compile)": "Trainer step, torch.compile", "Trainer (distill, compile)":
              "Trainer step, distillation, torch.compile"}
    targets = {"dlgn": "≤ 2.1x", "dlgn + distill": "≤ 2.5x", "Trainer": "≤ 2.1x", "Trainer (distill)": "≤ 2.5x"}
    for r in d["results"]:
        setting = f"{r['model']}, {r['device']}, batch {r['batch']}, {r['size']} px"
        for key, ratio in r["ratio"].items():
            if key == "source":
                continue
            rows.append([f"training: {labels.get(key, key)}", setting, f"{r['step_s']['source'] * 1e3:.0f} ms → "
                         f"{r['step_s'][key] * 1e3:.0f} ms", _x(ratio), targets.get(key, "")])
        if "peak_ratio" in r:
            rows.append(["training: peak memory", setting, f"{r['peak_bytes']['source'] / 2 ** 20:.0f} MiB → "
                         f"{r['peak_bytes']['dlgn'] / 2 ** 20:.0f} MiB", _x(r["peak_ratio"]["dlgn"]), "≤ 2.2x"])
    return rows


def rows_eval(d: dict[str, Any]) -> list[list[str]]:
    return [["eval, PyTorch", f"{r['model']}, batch {r['batch']}, {r['size']} px, {r['threads']} thread(s)",
             f"{r['source_ms']:.1f} ms → {r['dlgn_ms']:.1f} ms", _x(r["ratio"]), ""] for r in d["results"]]


def rows_onnx(d: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in d["results"]:
        for form, ratio in r["ratio"].items():
            rows.append([f"eval, onnxruntime CPU ({form} form, {r['dtype']})",
                         f"{r['model']}, batch {r['batch']}, {r['threads']} intra-op thread(s)",
                         f"{r['source_ms']:.1f} ms → {r['ms'][form]:.1f} ms", _x(ratio),
                         "≤ 2.1x" if form == "default" and r["dtype"] == "float32" else ""])
    return rows


def rows_accuracy(d: dict[str, Any]) -> list[list[str]]:
    by = {r["row"]: r for r in d["rows"]}
    src = d["source_acc"]
    out = []
    for title, r in by.items():
        if title.startswith("source"):
            continue
        what = f"{r['epochs']} epoch(s)" if r["epochs"] else "no training"
        out.append([f"accuracy: {title.strip().lstrip('+ ')}", f"{d['model']} on digits, {d['size']} px, {what}",
                    f"{src:.4f} → {r['acc']:.4f}", f"{r['acc'] / src:.3f} of the source", ""])
    return out


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[list[str]]]] = {
    "convert": rows_convert, "train_step": rows_train, "eval": rows_eval, "onnx": rows_onnx,
    "accuracy": rows_accuracy}


def summarize(results: str, seconds: dict[str, float]) -> dict[str, Any]:
    import torch
    rows: list[list[str]] = []
    machines = {}
    for name, fn in SUMMARIES.items():
        d = _load(results, name)
        if d is not None:
            rows += fn(d)
            machines[name] = d.get("machine", "")
    summary = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "torch": torch.__version__,
               "python": sys.version.split()[0], "machines": machines, "seconds": seconds,
               "columns": ["measure", "setting", "source → DLGN", "ratio", "target"], "rows": rows}
    lines = [f"Measured {summary['date']} on {summary['cpu']}, torch {summary['torch']}, Python {summary['python']} "
             f"(`python benchmarks/run_all.py`; each benchmark's JSON file in `benchmarks/results/`).", "",
             "| " + " | ".join(summary["columns"]) + " |", "|" + "---|" * len(summary["columns"])]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    summary["markdown"] = "\n".join(lines)
    write_json(os.path.join(results, "summary.json"), summary)
    atomic_write_text(os.path.join(results, "summary.md"), summary["markdown"] + "\n")
    return summary


BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def write_readme_table(path: str, markdown: str) -> None:
    """Replace what stands between the README's benchmark markers with ``markdown`` (written atomically)."""
    with open(path) as f:
        text = f.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: expected one {BEGIN} ... {END} pair around the benchmark table")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    atomic_write_text(path, f"{head}{BEGIN}\n{markdown}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                   help="run these benchmarks (the summary also takes the others' JSON files already there)")
    p.add_argument("--summarize", action="store_true", help="run nothing; rebuild the summary from the JSON files")
    p.add_argument("--quick", action="store_true", help="smoke budget: tiny models and inputs (numbers say little)")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="directory of the JSON files")
    p.add_argument("--readme", default=None, help="also put the table between this file's benchmark markers")
    args = p.parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    seconds = {} if args.summarize else {name: run_benchmark(name, args.results, args.quick) for name in args.only}
    summary = summarize(args.results, seconds)
    print("\n" + summary["markdown"])
    if args.readme:
        write_readme_table(args.readme, summary["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

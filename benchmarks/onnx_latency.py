"""onnxruntime latency of an exported DLGN against the source model's own ONNX export, side by side.

    python benchmarks/onnx_latency.py                       # timm resnet18 + resnet50, 224 px, batch 1 and 32
    python benchmarks/onnx_latency.py --models timm:resnet18 --batches 1 8 --repeats 10 5
    python benchmarks/onnx_latency.py --forms default portable --dtypes float32 float16 --threads 1 0

For each model: build it (random init, nothing downloaded), export the source model with torch.onnx (dynamic
batch; in each ``--dtypes`` precision) and the DLGN with ``relu2dlgn.export_onnx`` in each ``--forms`` form
(``default``: the form for onnxruntime's CPU provider; ``portable``: ``portable=True``) and precision (verified),
open them with the same onnxruntime settings, and time them *interleaved* (source, DLGN forms, source, ...) so
that all see the same machine state. The ratio is median(DLGN) / median(source); the ratio of the medians of
the timing thread's CPU time is printed too (with one intra-op thread onnxruntime runs on the calling thread, so
that figure is what other processes on a shared machine disturb least). A DLGN is two copies of the network
(gating + value), so ~2x is the physical floor of this ratio on a compute-bound CPU.

The converted DLGN's two copies start with identical weights, and the ONNX optimizer may then merge
identical computations of both (it deduplicates small identical weights, and then common subexpressions);
after fine-tuning they differ, so this benchmark perturbs the value network's weights by 1% before exporting
to time what a trained DLGN costs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

import relu2dlgn
from relu2dlgn.export import export_onnx
from relu2dlgn.utils.machine import cpu_name
from relu2dlgn.zoo import create_model

DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


def export_source(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """The source model's own ONNX export: the same exporter and dynamic batch axis as export_onnx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
        torch.onnx.export(ep, (), path, dynamo=True, input_names=["x"], output_names=["output"], verbose=False,
                          external_data=False)


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved(sessions: list[ort.InferenceSession], x: np.ndarray, repeats: int, warmup: int
                ) -> tuple[list[list[float]], list[list[float]]]:
    """Round-robin runs of ``sessions`` on ``x``: wall seconds and calling-thread CPU seconds per run of each."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    wall: list[list[float]] = [[] for _ in sessions]
    cpu: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t, c = time.perf_counter(), time.thread_time()
            s.run(None, f)
            wall[i].append(time.perf_counter() - t)
            cpu[i].append(time.thread_time() - c)
    return wall, cpu


def export_all(spec: str, args: argparse.Namespace, workdir: str) -> dict[tuple[str, str], str]:
    """The ONNX files of one model: {(dtype, form): path}, form "source" for the source model's own export."""
    torch.manual_seed(0)
    model = create_model(spec).eval()
    x = torch.randn(2, 3, args.size, args.size)
    dlgn = relu2dlgn.convert(model, mode=args.mode, pool=args.pool, example_inputs=(x,)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for prm in dlgn.value.parameters():
            prm.mul_(1 + 0.01 * torch.randn(prm.shape, generator=g))
    name = spec.replace(":", "_")
    paths = {}
    for dtype in args.dtypes:
        tdtype = DTYPES[dtype][0]
        paths[dtype, "source"] = os.path.join(workdir, f"{name}.{dtype}.onnx")
        t = time.perf_counter()
        export_source(copy.deepcopy(model).to(tdtype), x.to(tdtype), paths[dtype, "source"])
        print(f"\n{spec} {dtype}: source export {time.perf_counter() - t:.1f} s", flush=True)
        for form in args.forms:
            path = os.path.join(workdir, f"{name}.{args.mode}.{form}.{dtype}.onnx")
            kwargs = {"portable": True} if form == "portable" else {}
            if tdtype != torch.float32:
                kwargs["dtype"] = tdtype
            report = export_onnx(dlgn, path, (x,), **kwargs)
            print(report, flush=True)
            paths[dtype, form] = path
    return paths


def measure(args: argparse.Namespace, repeats: list[int], workdir: str) -> list[dict]:
    """Export each model into ``workdir`` and time every (dtype, threads, batch); one row each."""
    rows = []
    for spec in args.models:
        paths = export_all(spec, args, workdir)
        for dtype in args.dtypes:
            for threads in args.threads:
                names = ["source"] + list(args.forms)
                sessions = [session(paths[dtype, n], threads) for n in names]
                for batch, reps in zip(args.batches, repeats):
                    if batch > args.max_batch.get(f"{spec}:{dtype}", batch):
                        continue
                    xb = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size)).astype(
                        DTYPES[dtype][1])
                    wall, cpu = interleaved(sessions, xb, reps, args.warmup)
                    med = [statistics.median(w) * 1e3 for w in wall]
                    med_cpu = [statistics.median(c) * 1e3 for c in cpu]
                    row = {"model": spec, "dtype": dtype, "threads": threads or "default", "batch": batch,
                           "runs": reps, "load": os.getloadavg()[0], "source_ms": med[0],
                           "ms": dict(zip(names[1:], med[1:])),
                           "ratio": {n: m / med[0] for n, m in zip(names[1:], med[1:])},
                           "cpu_ratio": {n: c / med_cpu[0] for n, c in zip(names[1:], med_cpu[1:])},
                           "ratio_best": {n: min(w) / min(wall[0]) for n, w in zip(names[1:], wall[1:])}}
                    rows.append(row)
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else
                                          {a: round(b, 3) for a, b in v.items()} if isinstance(v, dict) else v)
                                      for k, v in row.items()}), flush=True)
                del sessions
    return rows


def _max_batch(items: list[str]) -> dict[str, int]:
    """``MODEL:DTYPE=N`` entries: skip batches above N for that model and precision (slow on a small CPU)."""
    out = {}
    for item in items:
        key, _, n = item.rpartition("=")
        out[key] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["timm:resnet18", "timm:resnet50"])
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, nargs="+", default=[20, 3],
                   help="timed runs per batch size (one value, or one per --batches entry)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mode", choices=("dlgn", "dgn"), default="dlgn")
    p.add_argument("--pool", choices=("gate", "avg"), default="gate", help="DLGN max-pool policy")
    p.add_argument("--forms", nargs="+", choices=("default", "portable"), default=["default"])
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["float32"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="onnxruntime intra-op threads, each timed (0: its default)")
    p.add_argument("--max-batch", nargs="*", default=[], metavar="MODEL:DTYPE=N",
                   help="skip batches above N for a model and precision, e.g. timm:vgg16_bn:float16=1")
    p.add_argument("--keep", default=None, help="directory to keep the .onnx files in (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.max_batch = _max_batch(args.max_batch)
    repeats = args.repeats if len(args.repeats) == len(args.batches) else [args.repeats[0]] * len(args.batches)

    machine = (f"{cpu_name()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f} at the start; "
               f"onnxruntime {ort.__version__} CPUExecutionProvider; torch {torch.__version__}; {args.size} px; "
               f"mode {args.mode}, pool {args.pool}")
    print(f"machine: {machine}")
    workdir = args.keep or tempfile.mkdtemp(prefix="relu2dlgn-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        rows = measure(args, repeats, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    forms = list(args.forms)
    header = ["model", "dtype", "threads", "batch", "runs", "load", "source ms"] + \
        [f"{f} ratio (cpu)" for f in forms] + [f"{f} ratio of best runs" for f in forms]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["model"], r["dtype"], str(r["threads"]), str(r["batch"]), str(r["runs"]), f"{r['load']:.1f}",
                 f"{r['source_ms']:.1f}"]
        cells += [f"{r['ratio'][f]:.2f}x ({r['cpu_ratio'][f]:.2f}x)" for f in forms]
        cells += [f"{r['ratio_best'][f]:.2f}x" for f in forms]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "args": {k: v for k, v in vars(args).items()}, "results": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""onnxruntime latency of an exported DLGN against the source model's own ONNX export, side by side.

    python benchmarks/onnx_latency.py                       # timm resnet18 + resnet50, 224 px, batch 1 and 32
    python benchmarks/onnx_latency.py --models timm:resnet18 --batches 1 8 --repeats 10 5

For each model: build it (random init, nothing downloaded), export the source model with torch.onnx (dynamic
batch) and the DLGN with ``relu2dlgn.export_onnx`` (verified), open both with the same onnxruntime settings,
and time them *interleaved* (source run, DLGN run, source run, ...) so that both see the same machine state;
the ratio is median(DLGN) / median(source); the ratio of the best (minimum) runs is printed too, as the
figure least disturbed by other processes on a shared machine. A DLGN is two copies of the network (gating + value), so ~2x is
the physical floor of this ratio on a compute-bound CPU.

The converted DLGN's two copies start with identical weights, and the ONNX optimizer may then merge
identical computations of both (it deduplicates small identical weights, and then common subexpressions);
after fine-tuning they differ, so this benchmark perturbs the value network's weights by 1% before exporting
to time what a trained DLGN costs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
from relu2dlgn.zoo import create_model


def export_source(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """The source model's own ONNX export: the same exporter and dynamic batch axis as export_onnx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
        torch.onnx.export(ep, (), path, dynamo=True, input_names=["x"], output_names=["output"], verbose=False,
                          external_data=False)


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved(a: ort.InferenceSession, b: ort.InferenceSession, x: np.ndarray, repeats: int,
                warmup: int) -> tuple[list[float], list[float]]:
    """Alternate runs of ``a`` and ``b`` on ``x``; seconds per run of each."""
    feeds_a = {a.get_inputs()[0].name: x}
    feeds_b = {b.get_inputs()[0].name: x}
    for _ in range(warmup):
        a.run(None, feeds_a)
        b.run(None, feeds_b)
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a.run(None, feeds_a)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b.run(None, feeds_b)
        tb.append(time.perf_counter() - t)
    return ta, tb


def measure(args: argparse.Namespace, repeats: list[int], workdir: str) -> list[tuple]:
    """Export each model and its DLGN into ``workdir`` and time them; one row per (model, batch)."""
    rows = []
    for spec in args.models:
        torch.manual_seed(0)
        model = create_model(spec).eval()
        x = torch.randn(2, 3, args.size, args.size)
        name = spec.replace(":", "_")
        src_path = os.path.join(workdir, f"{name}.onnx")
        dlgn_path = os.path.join(workdir, f"{name}.{args.mode}.onnx")
        t = time.perf_counter()
        export_source(model, x, src_path)
        t_src = time.perf_counter() - t
        dlgn = relu2dlgn.convert(model, mode=args.mode, pool=args.pool, example_inputs=(x,)).eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for prm in dlgn.value.parameters():
                prm.mul_(1 + 0.01 * torch.randn(prm.shape, generator=g))
        report = export_onnx(dlgn, dlgn_path, (x,))
        print(f"\n{spec}: source export {t_src:.1f} s; DLGN export (verified) {report.seconds:.1f} s")
        print(report)
        src, dl = session(src_path, args.threads), session(dlgn_path, args.threads)
        for batch, reps in zip(args.batches, repeats):
            xb = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
            ts, td = interleaved(src, dl, xb, reps, args.warmup)
            ms, md = statistics.median(ts) * 1e3, statistics.median(td) * 1e3
            rows.append((spec, batch, reps, ms, md, md / ms, min(td) / min(ts), os.path.getsize(src_path),
                         report.files[0].size))
            print(f"  batch {batch}: source {ms:.1f} ms, {args.mode} {md:.1f} ms (medians), ratio {md / ms:.2f}; "
                  f"best runs {min(ts) * 1e3:.1f} / {min(td) * 1e3:.1f} ms, ratio {min(td) / min(ts):.2f}",
                  flush=True)
        del src, dl
    return rows


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
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--keep", default=None, help="directory to keep the .onnx files in (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    repeats = args.repeats if len(args.repeats) == len(args.batches) else [args.repeats[0]] * len(args.batches)

    load = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, {load}; "
               f"onnxruntime {ort.__version__} CPUExecutionProvider, intra-op threads {args.threads or 'default'}; "
               f"torch {torch.__version__}; {args.size} px; mode {args.mode}, pool {args.pool}")
    print(f"machine: {machine}")
    workdir = args.keep or tempfile.mkdtemp(prefix="relu2dlgn-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        rows = measure(args, repeats, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    header = ("model", "batch", "runs", "source ms", f"{args.mode} ms", "ratio", "ratio of best runs",
              "source MB", f"{args.mode} MB")
    table = [header] + [(s, str(b), str(r), f"{ms:.1f}", f"{md:.1f}", f"{ratio:.2f}x", f"{best:.2f}x",
                         f"{ss / 1e6:.0f}", f"{ds / 1e6:.0f}")
                        for s, b, r, ms, md, ratio, best, ss, ds in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    if args.out:
        keys = ("model", "batch", "runs", "source_ms", "dlgn_ms", "ratio", "ratio_best", "source_bytes", "dlgn_bytes")
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": [dict(zip(keys, r)) for r in rows]}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

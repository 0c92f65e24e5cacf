"""Conversion wall time vs a bare torch.fx trace of the same model, measured side by side in one run.

    python benchmarks/convert.py [--models resnet50 vgg16 densenet121] [--repeats 5] [--threads 2]

The bare trace is torch.fx.Tracer with timm's own leaf modules / autowrapped functions (what
timm.layers.get_graph_node_names uses; plain torch.fx.symbolic_trace cannot trace timm's VGG head).
relu2dlgn.convert does that trace (plus a concrete re-trace where a model branches on shapes, as VGG's
head does), finds the gate sites, builds both graphs and copies the weights twice (gating + value).
Target: resnet50 in <= 0.3 s on 2 cores.

The numeric proof (``verify=True``, the default: relu2dlgn/verify.py) is measured side by side: conversion with
``verify=False``, with ``verify=True`` (timed alternately), and the proof's share of the conversion time (goal:
<= 25 % for resnet50). The proof casts the weights to float64 once and runs each graph once on a batch of three
1 x 3 x 16 x 16 points (32 px if 16 is too small, the example's size where the graphs are specialised to it, as
VGG's are).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import timm
import torch
import torch.fx as fx
from timm.layers import _fx as timm_fx

import relu2dlgn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402


def bare_trace(model: torch.nn.Module) -> fx.GraphModule:
    tracer = fx.Tracer(autowrap_functions=tuple(f for f in timm_fx.get_notrace_functions() if callable(f)))
    leaves = tuple(timm_fx.get_notrace_modules())
    base = tracer.is_leaf_module
    tracer.is_leaf_module = lambda m, name: isinstance(m, leaves) or base(m, name)
    graph = tracer.trace(model)
    return fx.GraphModule(model, graph)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired(a, b, repeats: int) -> tuple[float, float, float]:
    """Medians of a's time, b's time and of b - a, timed alternately (a, b, a, b, ...) so that a machine shared
    with other jobs slows both alike."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            gc.collect()  # the previous conversion's garbage is not this one's cost
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb), statistics.median(y - x for x, y in zip(ta, tb))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "densenet121"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<14}{'sites':>6}{'fx trace':>10}{'dlgn':>8}{'+verify':>9}{'verify':>8}{'share':>7}"
          f"{'dgn':>8}{'+verify':>9}{'verify':>8}{'share':>7}   [s]")
    rows = []
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        t_fx = timed(lambda: bare_trace(model), args.repeats)
        row = []
        for mode in ("dlgn", "dgn"):
            t0, t1, dt = paired(lambda: relu2dlgn.convert(model, mode=mode, verify=False),
                                lambda: relu2dlgn.convert(model, mode=mode), args.repeats)
            row += [t0, t1, dt, dt / t0]
        sites = len(relu2dlgn.convert(model, mode="dlgn", verify=False).sites)
        print(f"{name:<14}{sites:>6}{t_fx:>10.3f}" + "".join(
            f"{a:>8.3f}{b:>9.3f}{c:>8.3f}{d:>6.0%} " for a, b, c, d in (row[:4], row[4:])), flush=True)
        rows.append({"model": f"timm:{name}", "sites": sites, "fx_trace_s": t_fx,
                     **{f"{mode}_{what}": v for mode, part in (("dlgn", row[:4]), ("dgn", row[4:]))
                        for what, v in zip(("s", "verify_total_s", "verify_s", "verify_share"), part)}})
    if args.out:
        write_json(args.out, {"machine": machine(), "args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

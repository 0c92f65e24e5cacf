"""Conversion wall time vs a bare torch.fx trace of the same model, measured side by side in one run.

    python benchmarks/convert.py [--models resnet50 vgg16 densenet121] [--repeats 5] [--threads 2]

The bare trace is torch.fx.Tracer with timm's own leaf modules / autowrapped functions (what
timm.layers.get_graph_node_names uses; plain torch.fx.symbolic_trace cannot trace timm's VGG head).
relu2dlgn.convert does that trace (plus a concrete re-trace where a model branches on shapes, as VGG's
head does), finds the gate sites, builds both graphs and copies the weights twice (gating + value).
Target: resnet50 in <= 0.3 s on 2 cores.

The numeric proof (``verify=True``, the default: relu2dlgn/verify.py) is measured side by side: conversion with
``verify=False``, with ``verify=True``, and the proof's share of the conversion time (goal: <= 25 % for
resnet50). The proof casts both graphs to float64 in place and runs each once on a batch of three
1 x 3 x 16 x 16 points (the example's size where the graphs are specialised to it, as VGG's are).
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.fx as fx
from timm.layers import _fx as timm_fx

import relu2dlgn


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "densenet121"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<14}{'sites':>6}{'fx trace':>10}{'dlgn':>8}{'+verify':>9}{'verify':>8}{'share':>7}"
          f"{'dgn':>8}{'+verify':>9}{'verify':>8}{'share':>7}   [s]")
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        t_fx = timed(lambda: bare_trace(model), args.repeats)
        row = []
        for mode in ("dlgn", "dgn"):
            t0 = timed(lambda: relu2dlgn.convert(model, mode=mode, verify=False), args.repeats)
            t1 = timed(lambda: relu2dlgn.convert(model, mode=mode), args.repeats)
            row += [t0, t1, t1 - t0, (t1 - t0) / t0]
        sites = len(relu2dlgn.convert(model, mode="dlgn", verify=False).sites)
        print(f"{name:<14}{sites:>6}{t_fx:>10.3f}" + "".join(
            f"{a:>8.3f}{b:>9.3f}{c:>8.3f}{d:>6.0%} " for a, b, c, d in (row[:4], row[4:])))


if __name__ == "__main__":
    main()

"""Conversion wall time vs a bare torch.fx trace of the same model, measured side by side in one run.

    python benchmarks/convert.py [--models resnet50 vgg16 densenet121] [--repeats 5] [--threads 2]

The bare trace is torch.fx.Tracer with timm's own leaf modules / autowrapped functions (what
timm.layers.get_graph_node_names uses; plain torch.fx.symbolic_trace cannot trace timm's VGG head).
relu2dlgn.convert does that trace (plus a concrete re-trace where a model branches on shapes, as VGG's
head does), finds the gate sites, builds both graphs and copies the weights twice (gating + value).
Target: resnet50 in <= 0.3 s on 2 cores.
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
    print(f"{'model':<14}{'sites':>6}{'fx trace [s]':>14}{'convert dlgn [s]':>18}{'convert dgn [s]':>17}{'dlgn/trace':>12}")
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        t_fx = timed(lambda: bare_trace(model), args.repeats)
        t_dlgn = timed(lambda: relu2dlgn.convert(model, mode="dlgn"), args.repeats)
        t_dgn = timed(lambda: relu2dlgn.convert(model, mode="dgn"), args.repeats)
        sites = len(relu2dlgn.convert(model, mode="dlgn").sites)
        print(f"{name:<14}{sites:>6}{t_fx:>14.3f}{t_dlgn:>18.3f}{t_dgn:>17.3f}{t_dlgn / t_fx:>11.1f}x")


if __name__ == "__main__":
    main()

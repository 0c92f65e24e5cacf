"""Time and peak memory of the exact neural path kernel: K of 128 digits examples on a converted timm:resnet10t.

Target (the interpretability issue): at most a minute on 2 CPU cores and within 2 GB. Peak memory is the
process's peak resident set size (Python, torch and the data included), read from ``getrusage``; the
resident size just before the kernel is printed too. The model is randomly initialised (timing does not depend
on the weights) and converted with its defaults; the kernel runs with its defaults (float64 diagonal, float32
off-diagonal pairs when the Cauchy-Schwarz bound allows, 128 pairs per forward pass).

    python benchmarks/npk.py
    python benchmarks/npk.py --examples 64 --model timm:resnet18 --json benchmarks/results/npk.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

import relu2dlgn
from relu2dlgn import explain
from relu2dlgn.data import load_data
from relu2dlgn.utils.machine import cpu_name
from relu2dlgn.zoo import create_model


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="timm:resnet10t")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data("digits", augment=False)
    x = torch.stack([data.val[i][0] for i in range(args.examples)])
    model = create_model(args.model, num_classes=data.num_classes).eval()
    dlgn = relu2dlgn.convert(model, example_inputs=x[:2]).eval()
    before = rss_mb()
    start = time.perf_counter()
    K = explain.npk(dlgn, x, chunk=args.chunk)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "model": args.model, "examples": args.examples, "input": list(x.shape[1:]), "sites": len(dlgn.sites),
        "pairs": args.examples * (args.examples + 1) // 2, "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak, 1), "rss_before_mb": round(before, 1), "cpu": cpu_name(),
        "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "symmetric": bool(torch.equal(K, K.T)),
    }
    print(f"NPK of {args.examples} digits examples ({result['pairs']} pairs) on a converted {args.model} "
          f"({result['sites']} gate sites, input {tuple(x.shape[1:])}): {seconds:.1f} s, peak RSS {peak:.0f} MB "
          f"(RSS before the kernel {before:.0f} MB)")
    print(f"CPU: {result['cpu']}, {result['cores']} cores, {result['threads']} torch threads, torch "
          f"{result['torch']}, load average {result['load_average']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

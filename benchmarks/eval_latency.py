"""PyTorch inference latency (eval mode, hard gates, no gradients) of a DLGN against its source, side by side.

    python benchmarks/eval_latency.py                          # timm resnet18 + resnet50, 224 px, batch 1 and 32
    python benchmarks/eval_latency.py --models timm:resnet18 --batches 1 8 --repeats 20 5 --threads 1

For each model: build it (random init, nothing downloaded), convert it with the defaults, perturb the value
network's weights by 1 % (as after fine-tuning; see ``onnx_latency.py``), and time ``model(x)`` and ``dlgn(x)``
under ``torch.inference_mode`` *interleaved* (source, DLGN, source, ...). The ratio is median(DLGN) /
median(source); a DLGN is two copies of the network's linear layers, so ~2x is the floor.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

import relu2dlgn
from relu2dlgn.zoo import create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402


def interleaved(fns: list[Any], repeats: int, warmup: int = 1) -> list[list[float]]:
    """Round-robin calls of ``fns``: wall seconds per call of each."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return times


def measure(spec: str, size: int, batches: list[int], repeats: list[int]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = create_model(spec).eval()
    example = torch.randn(2, 3, size, size)
    dlgn = relu2dlgn.convert(model, example_inputs=(example,)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for prm in dlgn.value.parameters():
            prm.mul_(1 + 0.01 * torch.randn(prm.shape, generator=g))
    rows = []
    for batch, reps in zip(batches, repeats):
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            src, dl = interleaved([lambda: model(x), lambda: dlgn(x)], reps)
        row = {"model": spec, "batch": batch, "size": size, "runs": reps, "threads": torch.get_num_threads(),
               "load": os.getloadavg()[0], "source_ms": statistics.median(src) * 1e3,
               "dlgn_ms": statistics.median(dl) * 1e3}
        row["ratio"] = row["dlgn_ms"] / row["source_ms"]
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["timm:resnet18", "timm:resnet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, nargs="+", default=[20, 3],
                   help="timed runs per batch size (one value, or one per --batches entry)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats if len(args.repeats) == len(args.batches) else [args.repeats[0]] * len(args.batches)
    rows = [r for spec in args.models for r in measure(spec, args.size, args.batches, repeats)]
    print(f"\n{machine()}\n| model | batch | load | source ms | DLGN ms | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['load']:.1f} | {r['source_ms']:.1f} | {r['dlgn_ms']:.1f} | "
              f"{r['ratio']:.2f}x |")
    if args.out:
        write_json(args.out, {"machine": machine(), "args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

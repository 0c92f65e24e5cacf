"""Accuracy retention on the offline 8x8 digits (scikit-learn): source ReLU CNN -> DLGN.

1. train a source ReLU network (default timm resnet10t, 32x32 inputs) to validation accuracy A;
2. convert it (``relu2dlgn.convert``) and measure the DLGN's hard-gate accuracy right away, and after
   re-estimating its batch-norm statistics (no weight update);
3. fine-tune for ``--epochs`` (<= 5) epochs with distillation from the source and without;
4. train DLGNs from scratch (independent random gating/value init) for the same budget, without and with
   distillation; optionally the papers' variants (frozen gates, value input of ones).

Prints a markdown table and writes it, with the raw numbers, to ``--out`` (JSON).  Target: the distilled
DLGN reaches >= 0.97 A.

    python benchmarks/accuracy_retention.py                   # a few minutes on 2 CPU cores
    python benchmarks/accuracy_retention.py --variants        # + frozen gates, value input of ones
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import relu2dlgn
from relu2dlgn.data import load_data, make_loader
from relu2dlgn.training import finetune, fresh_dlgn, recalibrate_bn
from relu2dlgn.zoo import create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402


def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def train_source(model: torch.nn.Module, train_loader, epochs: int, lr: float) -> None:
    """AdamW + cosine decay, cross-entropy: a plain recipe for the source ReLU network."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    total = epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="timm:resnet10t")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--source-epochs", type=int, default=8)
    p.add_argument("--source-lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--variants", action="store_true", help="also frozen gates and value input of ones")
    p.add_argument("--only", default=None, help="comma-separated rows to run (distill,plain,scratch,...)")
    p.add_argument("--option", action="append", default=[], help="finetune option NAME=VALUE (all rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--source-cache", default=None,
                   help="a .safetensors file: load the source from it if it exists, else train and save it there")
    p.add_argument("--out", default="benchmarks/results/accuracy_retention.json")
    args = p.parse_args(argv)
    options: dict[str, Any] = {}
    for o in args.option:
        k, v = o.split("=", 1)
        options[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" and v not in ("nan",) else v

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_data("digits", image_size=args.size)
    train_loader = make_loader(data.train, args.batch_size, train=True)
    val_loader = make_loader(data.val, 256, train=False)
    example = data.example_inputs()

    t0 = time.perf_counter()
    source = create_model(args.model, num_classes=10)
    cached = bool(args.source_cache and os.path.exists(args.source_cache))
    if cached:
        from relu2dlgn.zoo import load_weights
        load_weights(source, args.source_cache)
    else:
        train_source(source, train_loader, args.source_epochs, args.source_lr)
        if args.source_cache:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in source.state_dict().items()}, args.source_cache)
    source.eval()
    A = accuracy(source, val_loader)
    rows: list[dict[str, Any]] = [{"row": "source ReLU network", "epochs": args.source_epochs, "acc": A}]
    if not cached:
        rows[0]["time_s"] = time.perf_counter() - t0
    print(f"source {args.model}: val acc {A:.4f}" + (" (from the cache)" if cached else
                                                   f" ({rows[0]['time_s']:.0f}s)"), flush=True)

    dlgn = relu2dlgn.convert(source, example_inputs=example)
    rows.append({"row": "DLGN right after conversion (hard gates)", "epochs": 0, "acc": accuracy(dlgn, val_loader)})
    torch.manual_seed(args.seed)  # the same batches as finetune's own re-estimation uses
    recalibrate_bn(dlgn, train_loader, 20)
    rows.append({"row": "  + batch-norm statistics re-estimated (no training)", "epochs": 0,
                 "acc": accuracy(dlgn, val_loader)})

    def make() -> torch.nn.Module:
        return create_model(args.model, num_classes=10).eval()

    runs = {
        "distill": ("fine-tuned, distillation (logits + gates)", lambda: relu2dlgn.convert(source, example_inputs=example),
                    {"teacher": source}),
        "plain": ("fine-tuned, no distillation", lambda: relu2dlgn.convert(source, example_inputs=example), {}),
        "scratch": ("from scratch (random init), no distillation", lambda: fresh_dlgn(make, args.seed, example_inputs=example), {}),
        "scratch_distill": ("from scratch, distillation", lambda: fresh_dlgn(make, args.seed, example_inputs=example),
                            {"teacher": source}),
    }
    if args.variants:
        runs["frozen"] = ("fine-tuned, frozen gates (value network only)",
                          lambda: relu2dlgn.convert(source, example_inputs=example), {"freeze_gating": True})
        runs["ones"] = ("fine-tuned, value input = ones, distillation",
                        lambda: relu2dlgn.convert(source, example_inputs=example, value_input="ones"),
                        {"teacher": source})
    only = set(args.only.split(",")) if args.only else set(runs)
    for key, (title, build, kw) in runs.items():
        if key not in only:
            continue
        torch.manual_seed(args.seed)
        model = build()
        t = time.perf_counter()
        res = finetune(model, train_loader, val_loader, epochs=args.epochs, progress=False,
                       seed=args.seed, **{**options, **kw})
        final = res.final
        rows.append({"row": title, "epochs": args.epochs, "acc": final["val_acc"],
                     "gate_agreement": final.get("val_gate_agreement"), "time_s": time.perf_counter() - t,
                     "history": [{k: v for k, v in r.items() if k != "val_gate_agreement_per_site"}
                                 for r in res.history]})
        print(f"{title}: {final['val_acc']:.4f} ({rows[-1]['time_s']:.0f}s) "
              f"per epoch: {[round(r['val_acc'], 4) for r in res.history]}", flush=True)

    lines = ["| | epochs | val acc (hard gates) | / source | after 1 epoch | gate agreement | time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ga = f"{r['gate_agreement']:.3f}" if r.get("gate_agreement") is not None else ""
        first = f"{r['history'][1]['val_acc']:.4f}" if len(r.get("history", [])) > 1 else ""
        t = f"{r['time_s']:.0f} s" if "time_s" in r else ""
        lines.append(f"| {r['row']} | {r['epochs']} | {r['acc']:.4f} | {r['acc'] / A:.3f} | {first} | {ga} | {t} |")
    table = "\n".join(lines)
    print()
    print(f"digits ({len(data.train)} train / {len(data.val)} val, {args.size}x{args.size}), {args.model}; "
          f"{machine()}; total {time.perf_counter() - t0:.0f}s")
    print(table)
    if args.out:
        write_json(args.out, {"model": args.model, "size": args.size, "machine": machine(), "options": options,
                              "args": vars(args), "source_acc": A, "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())

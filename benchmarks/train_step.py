"""Training-step time of a DLGN relative to its source ReLU network, measured in the same run.

A step is forward + cross-entropy + backward + AdamW update (fused kernels, as the Trainer uses) on one batch,
batch-norm in training mode.
Rows, each as time / source step time:

* ``dlgn``           — ``dlgn(x)`` in train mode: the core's soft gates (``sigmoid(beta q)``, soft max-pool);
* ``dlgn pool=avg``  — converted with ``pool="avg"`` (the authors' choice: no max-pool gate);
* ``dlgn + distill`` — plus the teacher forward (no grad), logit KD and the gate-agreement loss;
* ``Trainer`` / ``Trainer (distill)`` — the whole ``relu2dlgn.training.Trainer`` step (soft gates, metrics, NaN guard, beta schedule; with distillation also the teacher, the losses
  and the gate agreement), timed as an epoch of one batch.

Source and DLGN steps are timed alternately, ``--repeats`` rounds of ``--steps`` steps, and the median round
is reported, so load changes on a shared machine hit both alike.  CPU always; CUDA too when present (bf16
autocast and channels_last there, as the Trainer does).  Target: the DLGN step <= 2.1x.

    python benchmarks/train_step.py
    python benchmarks/train_step.py --models timm:resnet18 --size 64 --batch 32
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from relu2dlgn.training import FinetuneConfig, TeacherTap, Trainer, kd_loss, match_sites, site_gate_terms
from relu2dlgn.zoo import create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_retention import machine  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, Callable]:
    amp = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    source = model.to(device).train()
    dlgn = relu2dlgn.convert(model, example_inputs=x[:2]).to(device).train()
    dlgn_avg = relu2dlgn.convert(model, example_inputs=x[:2], pool="avg").to(device).train()
    if device.type == "cuda":
        dlgn.to(memory_format=torch.channels_last)
        dlgn_avg.to(memory_format=torch.channels_last)
    teacher = TeacherTap(copy.deepcopy(model).eval(), targets=True).eval()  # its own copy: the source trains
    pairs = match_sites(dlgn, teacher.site_nodes, teacher.site_kinds)
    specs = dlgn.gate_specs
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for m in (source, dlgn, dlgn_avg)}

    def plain(m: nn.Module) -> Callable:
        opt = opts[id(m)]

        def step():
            with autocast():
                loss = F.cross_entropy(m(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def distill():
        opt = opts[id(dlgn)]
        with autocast():
            with torch.no_grad():
                t_logits, t_qs = teacher(x)
            r = dlgn.run(x, hard=False)
            out, qs = r.output, r.pre_activations
            loss = 0.5 * F.cross_entropy(out.float(), y) + 0.5 * kd_loss(out, t_logits, 4.0)
            loss = loss + torch.stack([site_gate_terms(specs[i], qs[i], t_qs[j], dlgn.beta)[0]
                                       for i, j in pairs]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    source.train()
    return {"source": plain(source), "dlgn": plain(dlgn), "dlgn pool=avg": plain(dlgn_avg),
            "dlgn + distill": distill}


def trainer_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 distill: bool) -> Callable:
    """One Trainer epoch of one batch: the full step (metrics, NaN guard, beta schedule), with or without
    distillation from the source network."""
    teacher = copy.deepcopy(model).eval()
    dlgn = relu2dlgn.convert(teacher, example_inputs=x[:2])
    cfg = FinetuneConfig.from_options(epochs=1, progress=False, recalibrate_bn=0, eval_before=False,
                                      device=str(device))
    trainer = Trainer(dlgn, [(x, y)], teacher=teacher if distill else None, config=cfg)
    return lambda: trainer.train_epoch(1)


def bench(spec: str, size: int, batch: int, device: torch.device, steps: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(spec, num_classes=10).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = model.to(device)
    if device.type == "cuda":  # as the Trainer does on GPU
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    fns = make_steps(model, x, y, device)
    fns["Trainer"] = trainer_step(model, x, y, device, distill=False)
    fns["Trainer (distill)"] = trainer_step(model, x, y, device, distill=True)
    for f in fns.values():  # warm-up
        for _ in range(2):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                f()
            _sync(device)
            times[name].append((time.perf_counter() - t) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": spec, "size": size, "batch": batch, "device": str(device),
            "step_s": med, "ratio": {k: v / med["source"] for k, v in med.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="timm:resnet10t,timm:resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for spec in args.models.split(","):
            batch = args.gpu_batch if device.type == "cuda" else args.batch
            r = bench(spec, args.size, batch, device, args.steps, args.repeats)
            results.append(r)
            print(json.dumps({"model": spec, "device": str(device), "ratio": {k: round(v, 3) for k, v in r["ratio"].items()}}),
                  flush=True)
    header = ["model", "device", "input", "source step"] + [k for k in results[0]["ratio"] if k != "source"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["model"], r["device"], f"{r['batch']}x3x{r['size']}x{r['size']}", f"{r['step_s']['source'] * 1e3:.1f} ms"]
        cells += [f"{r['ratio'][k]:.2f}x" for k in header[4:]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    info = machine()
    if torch.cuda.is_available():
        info += f"; {torch.cuda.get_device_name()}"
    print(f"\n{info}\n{table}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": results, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step time of a DLGN relative to its source ReLU network, measured in the same run.

A step is forward + cross-entropy + backward + AdamW update (fused kernels, as the Trainer uses) on one batch,
batch-norm in training mode.
Rows, each as time / source step time:

* ``dlgn``           — ``dlgn(x)`` in train mode: the core's soft gates (``sigmoid(beta q)``, soft max-pool);
* ``dlgn pool=avg``  — converted with ``pool="avg"`` (the authors' choice: no max-pool gate);
* ``dlgn + distill`` — plus the teacher forward (no grad), logit KD and the gate-agreement loss;
* ``Trainer`` / ``Trainer (distill)`` — the whole ``relu2dlgn.training.Trainer`` step (soft gates, metrics, NaN guard, beta schedule; with distillation also the teacher, the losses
  and the gate agreement), timed as an epoch of one batch;
* with ``--compile``: ``Trainer (compile)`` / ``Trainer (distill, compile)`` — the same with
  ``finetune(..., compile=True)`` (torch.compile, inductor), timed after the compilation (whose time is printed).

Source and DLGN steps are timed alternately, ``--repeats`` rounds of ``--steps`` steps after ``--warmup`` steps
of each, and the median round is reported, so load changes on a shared machine hit both alike. The warm-up is
long because one process interleaves eight training setups: glibc's heap keeps growing (fragmentation) for
dozens of steps, each growth faulting fresh pages in (~2,000-5,000 minor faults, 25-50 ms, for the step that
pays it), where a training job running one model settles in ~15 steps; the minor page faults per timed step are
reported (``faults``); the CPU time of the timing thread is reported
too (``--cpu-time``: ratios from it), which other processes on a shared machine disturb less.  CPU always; CUDA
too when present (bf16 autocast and channels_last there, as the Trainer does).  Targets: the DLGN step <= 2.1x,
the distillation step <= 2.5x.

``--malloc retain`` (the default) keeps freed memory in the process from the start, for every row alike, as a
CPU training job does (:func:`relu2dlgn.utils.memory.retain_freed_memory`, the ``retain_memory`` option: glibc's
trim/mmap thresholds); ``--malloc default`` leaves glibc adaptive, where the DLGN's steps fault their large
temporaries in again every step and the source's do not.

``--memory``: the peak resident memory of training (the high-water mark ``VmHWM`` of a fresh process that builds
the model and runs ``--steps`` steps, less that of one that only imports torch) for the source, the DLGN and the DLGN with
distillation, and the ratios; target <= 2.2x.

    python benchmarks/train_step.py
    python benchmarks/train_step.py --models timm:resnet18 --size 64 --batch 32 --threads 1 --compile --memory
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from relu2dlgn.training import FinetuneConfig, TeacherTap, Trainer, kd_loss, match_sites, site_gate_terms
from relu2dlgn.utils.memory import retain_freed_memory
from relu2dlgn.zoo import create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
               only: str | None = None) -> Any:
    """The step functions by name (``only``: just that one, building nothing else — the memory measurement)."""
    amp = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    need = {"source": ("source",), "dlgn": ("dlgn",), "dlgn pool=avg": ("dlgn_avg",),
            "dlgn + distill": ("dlgn", "teacher")}.get(only or "", ("source", "dlgn", "dlgn_avg", "teacher"))
    teacher = TeacherTap(copy.deepcopy(model).eval(), targets=True).eval() if "teacher" in need else None
    source = model.to(device).train()
    dlgn = relu2dlgn.convert(model, example_inputs=x[:2]).to(device).train() if "dlgn" in need else None
    dlgn_avg = relu2dlgn.convert(model, example_inputs=x[:2], pool="avg").to(device).train() \
        if "dlgn_avg" in need else None
    if device.type == "cuda":
        for m in (dlgn, dlgn_avg):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    pairs = match_sites(dlgn, teacher.site_nodes, teacher.site_kinds) if teacher is not None else []
    specs = dlgn.gate_specs if dlgn is not None else ()
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
            for m, name in ((source, "source"), (dlgn, "dlgn"), (dlgn_avg, "dlgn_avg")) if name in need}

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
            loss = loss + torch.stack([site_gate_terms(specs[i], qs[i], t_qs[j], dlgn.beta, gate=r.gates[i])[0]
                                       for i, j in pairs]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    source.train()
    fns = {"source": lambda: plain(source), "dlgn": lambda: plain(dlgn), "dlgn pool=avg": lambda: plain(dlgn_avg),
           "dlgn + distill": lambda: distill}
    if only is not None:
        return fns[only]()
    return {k: f() for k, f in fns.items()}


def trainer_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 distill: bool, compile: bool = False, retain: bool = True) -> Callable:
    """One Trainer epoch of one batch: the full step (metrics, NaN guard, beta schedule), with or without
    distillation from the source network, eager or compiled."""
    teacher = copy.deepcopy(model).eval()
    dlgn = relu2dlgn.convert(teacher, example_inputs=x[:2])
    cfg = FinetuneConfig.from_options(epochs=1, progress=False, recalibrate_bn=0, eval_before=False,
                                      device=str(device), compile=compile, retain_memory=retain)
    trainer = Trainer(dlgn, [(x, y)], teacher=teacher if distill else None, config=cfg)
    return lambda: trainer.train_epoch(1)


def bench(spec: str, size: int, batch: int, device: torch.device, steps: int, repeats: int,
          compile: bool = False, retain: bool = True, warmup: int = 8) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(spec, num_classes=10).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = model.to(device)
    if device.type == "cuda":  # as the Trainer does on GPU
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    fns = make_steps(model, x, y, device)
    fns["Trainer"] = trainer_step(model, x, y, device, distill=False, retain=retain)
    fns["Trainer (distill)"] = trainer_step(model, x, y, device, distill=True, retain=retain)
    compile_s: dict[str, float] = {}
    if compile:
        for name, distill in (("Trainer (compile)", False), ("Trainer (distill, compile)", True)):
            fns[name] = trainer_step(model, x, y, device, distill=distill, compile=True, retain=retain)
            t = time.perf_counter()
            fns[name]()  # compiles
            compile_s[name] = time.perf_counter() - t
            print(f"{spec}: {name}: first step (compilation) {compile_s[name]:.0f} s", flush=True)
    for _ in range(warmup):  # interleaved, as timed
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, int] = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, f in fns.items():
            _sync(device)
            t, c, flt = time.perf_counter(), time.thread_time(), _minor_faults()
            for _ in range(steps):
                f()
            _sync(device)
            times[name].append((time.perf_counter() - t) / steps)
            cpu[name].append((time.thread_time() - c) / steps)
            faults[name] += _minor_faults() - flt
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": spec, "size": size, "batch": batch, "device": str(device), "load": os.getloadavg()[0],
            "step_s": med, "ratio": {k: v / med["source"] for k, v in med.items()},
            "cpu_ratio": {k: v / med_cpu["source"] for k, v in med_cpu.items()}, "compile_s": compile_s,
            "faults_per_step": {k: v / (repeats * steps) for k, v in faults.items()}}


_MEMORY_CHILD = """
import resource, sys, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
if {retain!r}:
    from relu2dlgn.utils.memory import retain_freed_memory
    retain_freed_memory()
if {what!r} != "baseline":
    from train_step import make_steps
    from relu2dlgn.zoo import create_model
    torch.manual_seed(0)
    model = create_model({spec!r}, num_classes=10).eval()
    x, y = torch.randn({batch}, 3, {size}, {size}), torch.randint(0, 10, ({batch},))
    step = make_steps(model, x, y, torch.device("cpu"), only={what!r})
    del model  # held by the step where it trains (the source); otherwise not part of the training state
    for _ in range({steps}):
        step()
try:  # this process's own high-water mark (ru_maxrss would include the parent's, kept across fork and exec)
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_memory(spec: str, size: int, batch: int, steps: int, threads: int, retain: bool) -> dict[str, float]:
    """Peak resident bytes of training, per step kind, each in a fresh process, less an idle torch process's."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for what in ("baseline", "source", "dlgn", "dlgn + distill"):
        code = _MEMORY_CHILD.format(here=here, threads=threads, what=what, spec=spec, batch=batch, size=size,
                                    steps=steps, retain=retain)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[what] = float(res.stdout.strip().splitlines()[-1])
    base = out.pop("baseline")
    return {k: v - base for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="timm:resnet10t,timm:resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=8, help="untimed steps of each setup first (see the docstring)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time the Trainer step with compile=True")
    p.add_argument("--memory", action="store_true", help="also measure the peak memory of training (CPU)")
    p.add_argument("--cpu-time", action="store_true", help="ratios of the timing thread's CPU time")
    p.add_argument("--malloc", choices=("retain", "default"), default="retain",
                   help="retain: keep freed memory in the process (as a CPU training job does; every row alike); "
                        "default: glibc's adaptive thresholds")
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        retain_freed_memory()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for spec in args.models.split(","):
            batch = args.gpu_batch if device.type == "cuda" else args.batch
            r = bench(spec, args.size, batch, device, args.steps, args.repeats, compile=args.compile,
                      retain=args.malloc == "retain", warmup=args.warmup)
            if args.memory and device.type == "cpu":
                r["peak_bytes"] = peak_memory(spec, args.size, batch, args.steps, torch.get_num_threads(),
                                              args.malloc == "retain")
                r["peak_ratio"] = {k: v / r["peak_bytes"]["source"] for k, v in r["peak_bytes"].items()}
            results.append(r)
            print(json.dumps({"model": spec, "device": str(device), "load": round(r["load"], 1),
                              "ratio": {k: round(v, 3) for k, v in r["ratio"].items()},
                              "cpu_ratio": {k: round(v, 3) for k, v in r["cpu_ratio"].items()},
                              "faults_per_step": {k: round(v) for k, v in r["faults_per_step"].items()},
                              **({"peak_ratio": {k: round(v, 2) for k, v in r["peak_ratio"].items()}}
                                 if "peak_ratio" in r else {})}), flush=True)
    key = "cpu_ratio" if args.cpu_time else "ratio"
    header = ["model", "device", "input", "load", "source step"] + [k for k in results[0]["ratio"] if k != "source"]
    if any("peak_ratio" in r for r in results):
        header += ["peak memory: source", "dlgn", "dlgn + distill"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["model"], r["device"], f"{r['batch']}x3x{r['size']}x{r['size']}", f"{r['load']:.1f}",
                 f"{r['step_s']['source'] * 1e3:.1f} ms"]
        cells += [f"{r[key][k]:.2f}x" for k in r["ratio"] if k != "source"]
        if "peak_ratio" in r:
            cells += [f"{r['peak_bytes']['source'] / 2 ** 20:.0f} MiB", f"{r['peak_ratio']['dlgn']:.2f}x",
                      f"{r['peak_ratio']['dlgn + distill']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    info = machine() + f"; malloc {args.malloc}"
    if torch.cuda.is_available():
        info += f"; {torch.cuda.get_device_name()}"
    print(f"\n{info}\n{table}")
    if args.out:
        write_json(args.out, {"machine": info, "args": vars(args), "results": results, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())

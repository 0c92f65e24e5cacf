"""Convert the timm registry (and torchvision's classification models) and tabulate what happens.

    python benchmarks/zoo_sweep.py [--stride 4] [--max-params 30e6] [--time-limit 300] [--no-torchvision]
                                   [--models timm:resnet18 tv:vgg11 ...] [--out benchmarks/results]

For every model (every ``--stride``-th of ``timm.list_models()``, then torchvision's classification models)
with at most ``--max-params`` parameters (counted on the meta device, before building): build it (random
init, randomised batch-norm statistics, eval mode) and record

* ``sites`` and their ``kinds`` (a DGN conversion), and ``eager_gates``: the activation / max-pool calls an eager
  forward makes (counted with a torch function mode: an independent count of the sites);
* ``dgn_exact``: the DGN's output equals the source's on a batch of 2 random inputs (relative error <= 1e-5;
  the error is recorded);
* ``dlgn``: strict DLGN conversion ``built``, ``refused`` (the first operation the allow-list refused), or the
  error type;
* ``fx``: whether timm's own fx feature extraction (``timm.models._features_fx.get_graph_node_names``, with
  timm's leaf modules) traces the model (torchvision: ``torchvision.models.feature_extraction``);
* ``raw_errors``: errors ``convert`` raised that are not a ``Relu2DlgnError`` (should be none);
* ``seconds``.

Inputs are 64 px (the model's ``pretrained_cfg`` size where it needs a fixed size: tried after 64 px fails).
Each model runs in a worker process with a time limit; a model over it is recorded as ``timeout`` and the
worker is restarted. Results go to ``--out``/zoo_sweep.json and zoo_sweep.md (rows and counts), rewritten
after every model, so an interrupted sweep keeps what it did.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from typing import Any

SIZE = 64
EXACT = 1e-5


# --------------------------------------------------------------------------------------------------
# one model (in the worker)
# --------------------------------------------------------------------------------------------------

def _build(spec: str, device: str = "cpu"):
    import torch
    lib, name = spec.split(":", 1)
    with torch.device(device):
        if lib == "timm":
            import timm
            return timm.create_model(name, pretrained=False)
        import torchvision
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
        return torchvision.models.get_model(name, weights=None, **kwargs)


def _randomize_bn(model) -> None:
    import torch
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _sizes(model) -> list[tuple[int, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = tuple(cfg.get("input_size") or (3, 224, 224))
    small = (shape[0], SIZE, SIZE)
    return [small] if small == shape else [small, shape]


def _leaves(y: Any) -> list:
    import torch
    from torch.utils import _pytree as pytree
    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor) and t.is_floating_point()]


_GATE_OPS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "hardtanh", "hardtanh_", "relu6",
             "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d"}


def _eager_gate_calls(model, x) -> int:
    import torch
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in _GATE_OPS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return Count.n


def _rel(a, b) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())


def _fx_traces(spec: str, model) -> bool:
    lib = spec.split(":", 1)[0]
    try:
        if lib == "timm":
            from timm.models._features_fx import get_graph_node_names
        else:
            from torchvision.models.feature_extraction import get_graph_node_names
        get_graph_node_names(model)
        return True
    except Exception:
        return False


def _first_refused(message: str) -> str:
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("- "):
            return line[2:]
    return message.splitlines()[0][:200]


def sweep_one(spec: str, max_params: float) -> dict[str, Any]:
    """Everything the table records for one model (never raises)."""
    import torch
    import relu2dlgn

    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": spec}
    try:
        try:
            meta = _build(spec, "meta")
        except Exception:  # initialisers that need data (torchvision's RegNet): count on the CPU
            meta = _build(spec)
        row["params"] = sum(p.numel() for p in meta.parameters())
        del meta
    except Exception as exc:
        row.update(status="build failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return row
    if row["params"] > max_params:
        row["status"] = "too large"
        return row
    torch.manual_seed(0)
    try:
        model = _build(spec).eval()
    except Exception as exc:
        row.update(status="build failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return row
    _randomize_bn(model)
    row["fx"] = _fx_traces(spec, model)
    model.eval()
    x = None
    for shape in _sizes(model):
        cand = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                ref = _leaves(model(cand))
            x = cand
            break
        except Exception:
            continue
    if x is None:
        row.update(status="source fails", error="the source model runs on neither 64 px nor its cfg size")
        return row
    row["input"] = "x".join(map(str, x.shape[1:]))
    try:
        row["eager_gates"] = _eager_gate_calls(model, x[:1])
    except Exception:
        row["eager_gates"] = None
    raw: list[str] = []
    try:
        dgn = relu2dlgn.convert(model, mode="dgn", example_inputs=(x[:1],)).eval()
        row["sites"] = len(dgn.sites)
        row["kinds"] = dgn.report.kind_counts()
        with torch.no_grad():
            got = _leaves(dgn(x))
        err = max(_rel(a, b) for a, b in zip(got, ref)) if got and len(got) == len(ref) else float("inf")
        row["dgn_error"] = err
        row["dgn_exact"] = err <= EXACT
    except relu2dlgn.Relu2DlgnError as exc:
        msg = str(exc)
        row["sites"] = 0 if "has no gate site" in msg else None
        row["dgn_exact"] = None
        row["dgn_failure"] = None if row["sites"] == 0 else f"{type(exc).__name__}: {msg.splitlines()[0][:300]}"
    except Exception as exc:
        raw.append(f"dgn: {type(exc).__name__}: {str(exc)[:200]}")
        row.update(sites=None, dgn_exact=None, dgn_failure=f"RAW {type(exc).__name__}: {str(exc)[:300]}")
    if row.get("sites"):
        try:
            relu2dlgn.convert(model, mode="dlgn", example_inputs=(x[:1],))
            row["dlgn"] = "built"
        except relu2dlgn.ConversionError as exc:
            msg = str(exc)
            if msg.startswith("strict DLGN conversion"):
                row["dlgn"] = "refused"
                row["dlgn_first_refused"] = _first_refused(msg)
            else:
                row["dlgn"] = f"ConversionError: {msg.splitlines()[0][:200]}"
        except relu2dlgn.Relu2DlgnError as exc:
            row["dlgn"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        except Exception as exc:
            raw.append(f"dlgn: {type(exc).__name__}: {str(exc)[:200]}")
            row["dlgn"] = f"RAW {type(exc).__name__}: {str(exc)[:200]}"
    row["raw_errors"] = raw
    row["status"] = "ok"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _worker(conn, threads: int, max_params: float) -> None:
    import logging

    import torch
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    while True:
        spec = conn.recv()
        if spec is None:
            return
        try:
            row = sweep_one(spec, max_params)
        except BaseException as exc:  # the worker must answer
            row = {"model": spec, "status": "worker error", "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc()[-1000:]}
        conn.send(row)


# --------------------------------------------------------------------------------------------------
# the sweep (parent)
# --------------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, threads: int, max_params: float):
        self.args = (threads, max_params)
        self.start()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.proc.start()

    def run(self, spec: str, limit: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.conn.send(spec)
        if self.conn.poll(limit):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            status = "worker died"
        else:
            status = "timeout"
        self.proc.kill()
        self.proc.join()
        self.start()
        return {"model": spec, "status": status, "seconds": round(time.perf_counter() - t0, 1)}

    def stop(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tried = [r for r in rows if r.get("status") not in ("too large",)]
    ok = [r for r in tried if r.get("status") == "ok"]
    with_sites = [r for r in ok if r.get("sites")]
    fx = [r for r in with_sites if r.get("fx")]
    return {
        "listed": len(rows),
        "tried (<= max params)": len(tried),
        "ran": len(ok),
        "with gate sites": len(with_sites),
        "no gate site": sum(1 for r in ok if r.get("sites") == 0),
        "sites != eager gate calls": [f"{r['model']}: {r.get('sites')} sites, {r.get('eager_gates')} calls" for r in ok
                                      if r.get("sites") is not None and r.get("sites") != r.get("eager_gates")],
        "DGN exact": sum(1 for r in with_sites if r.get("dgn_exact")),
        "DGN not exact": [r["model"] for r in with_sites if r.get("dgn_exact") is False],
        "DGN conversion failed": [f"{r['model']}: {r.get('dgn_failure')}" for r in ok
                                  if r.get("sites") is None],
        "strict DLGN built": sum(1 for r in with_sites if r.get("dlgn") == "built"),
        "strict DLGN refused": sum(1 for r in with_sites if r.get("dlgn") == "refused"),
        "strict DLGN other errors": [f"{r['model']}: {r['dlgn']}" for r in with_sites
                                     if r.get("dlgn") not in ("built", "refused")],
        "fx extraction traces (with sites)": len(fx),
        "fx traces but DGN not exact": [r["model"] for r in fx if not r.get("dgn_exact")],
        "non-Relu2DlgnError errors": [f"{r['model']}: {e}" for r in ok for e in r.get("raw_errors", [])],
        "timeouts": [r["model"] for r in tried if r.get("status") == "timeout"],
        "other failures": [f"{r['model']}: {r.get('status')} {r.get('error', '')}".strip() for r in tried
                           if r.get("status") not in ("ok", "timeout")],
    }


def _md_row(r: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in (r.get("kinds") or {}).items())
    if r.get("dgn_exact") is None:
        dgn = "-" if r.get("sites") == 0 else (r.get("dgn_failure") or r.get("status", "-"))
    else:
        dgn = f"{'yes' if r['dgn_exact'] else 'NO'} ({r['dgn_error']:.0e})"
    dlgn = r.get("dlgn", "-")
    if dlgn == "refused":
        dlgn = f"refused: {r.get('dlgn_first_refused', '')}"
    params = f"{r['params'] / 1e6:.1f} M" if r.get("params") is not None else "-"
    fx = {True: "yes", False: "no"}.get(r.get("fx"), "-")
    cells = [r["model"], params, str(r.get("sites", "-")), str(r.get("eager_gates", "-")), kinds, dgn,
             dlgn.replace("|", "/"), fx, str(r.get("seconds", "-"))]
    return "| " + " | ".join(c.replace("\n", " ") for c in cells) + " |"


def summaries(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Counts over all rows, and per library."""
    out = {"all": counts(rows)}
    for lib, prefix in (("timm", "timm:"), ("torchvision", "tv:")):
        part = [r for r in rows if r["model"].startswith(prefix)]
        if part and len(part) < len(rows):
            out[lib] = counts(part)
    return out


def write(out: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    os.makedirs(out, exist_ok=True)
    summary = summaries(rows)
    with open(os.path.join(out, "zoo_sweep.json"), "w") as f:
        json.dump({"settings": settings, "counts": summary, "rows": rows}, f, indent=1)
    lines = [f"# Zoo sweep ({settings['date']})", "",
             f"{settings['machine']}; torch {settings['torch']}, timm {settings['timm']}, torchvision "
             f"{settings['torchvision']}; every {settings['stride']}-th timm model, <= {settings['max_params']:.0f} "
             f"parameters, {settings['time_limit']} s per model, {settings['threads']} thread(s).", "",
             "## Counts", ""]
    keys = list(summary["all"])
    libs = list(summary)
    lines += ["| | " + " | ".join(libs) + " |", "|---|" + "---|" * len(libs)]
    for k in keys:
        cells = [str(len(summary[lib][k]) if isinstance(summary[lib][k], list) else summary[lib][k]) for lib in libs]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    for k in keys:
        if isinstance(summary["all"][k], list) and summary["all"][k]:
            lines += ["", f"{k}:"] + [f"- {x}" for x in summary["all"][k]]
    lines += ["", "## Models", "",
              "| model | params | sites | eager gate calls | kinds | DGN exact (rel. error) | strict DLGN | fx traces | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [_md_row(r) for r in rows if r.get("status") != "too large"]
    with open(os.path.join(out, "zoo_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stride", type=int, default=1, help="take every N-th timm model")
    parser.add_argument("--max-params", type=float, default=30e6)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--models", nargs="*", help="explicit specs (timm:NAME, tv:NAME) instead of the registry")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    import timm
    import torch
    import torchvision

    from relu2dlgn.utils.machine import cpu_name

    if args.models:
        specs = list(args.models)
    else:
        specs = [f"timm:{n}" for n in timm.list_models()[::args.stride]]
        if not args.no_torchvision:
            specs += [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    settings = {"date": time.strftime("%Y-%m-%d"), "stride": args.stride, "max_params": args.max_params,
                "time_limit": args.time_limit, "threads": args.threads, "size": SIZE,
                "torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
                "machine": f"{os.cpu_count()}-core {platform.machine()} ({cpu_name()})",
                "python": sys.version.split()[0]}
    rows: list[dict[str, Any]] = []
    worker = Worker(args.threads, args.max_params)
    try:
        for i, spec in enumerate(specs):
            row = worker.run(spec, args.time_limit)
            rows.append(row)
            print(f"[{i + 1}/{len(specs)}] {spec}: {row.get('status')} sites={row.get('sites')} "
                  f"dgn={row.get('dgn_exact')} dlgn={row.get('dlgn')} fx={row.get('fx')} {row.get('seconds')}s",
                  flush=True)
            write(args.out, rows, settings)
    finally:
        worker.stop()
    print(json.dumps(summaries(rows), indent=1))




if __name__ == "__main__":
    main()

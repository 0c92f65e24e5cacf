"""Verification of the written files: ``onnx.checker``, then onnxruntime against PyTorch on a fresh batch (the
criteria are in :func:`relu2dlgn.export.export_onnx`'s docstring)."""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..dlgn import DLGN
from ..errors import ExportError
from ..utils.fs import StagedFiles
from .diagnostics import root_message
from .report import SiteAgreement, Verification

__all__ = ["PROVIDER", "run_onnx", "check_and_verify"]

PROVIDER = "CPUExecutionProvider"


def _fresh_batch(examples: Sequence[torch.Tensor], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """New inputs with ``batch`` rows: Gaussian with each example's mean and std (floating point), or the
    example's rows cycled (integer inputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ex in examples:
        if ex.is_floating_point():
            std = ex.float().std().item() if ex.numel() > 1 else 1.0
            x = torch.randn((batch, *ex.shape[1:]), generator=g) * (std if std > 0 else 1.0) + ex.float().mean()
            out.append(x.to(ex.dtype))
        else:
            idx = torch.arange(batch) % ex.shape[0]
            out.append(ex[idx].clone())
    return tuple(out)


def _session(source: str | bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(source, opts, providers=[PROVIDER])


def run_onnx(session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an onnxruntime session (a seam for tests)."""
    return session.run(None, feeds)


def _feeds_for(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _tie_gaps(spec: Any, q: torch.Tensor, g_ref: torch.Tensor, g_onnx: torch.Tensor) -> tuple[int, float]:
    """Number of gates that differ, and the largest 'distance from a tie' among them, relative to max|q|."""
    scale = q.abs().max().item() if q.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    if spec.kind == "maxpool":
        flat = q.flatten(2)
        n_pos = flat.shape[2]
        i_ref, i_onnx = g_ref.flatten(2), g_onnx.flatten(2)
        if (i_onnx < 0).any() or (i_onnx >= n_pos).any():
            return int((i_ref != i_onnx).sum()), math.inf
        diff = i_ref != i_onnx
        gap = (flat.gather(2, i_ref) - flat.gather(2, i_onnx)).abs()
    elif spec.kind == "hardtanh":
        diff = g_ref != g_onnx
        gap = torch.stack([(q - spec.lo).abs(), (q - spec.hi).abs()])
    else:
        diff = g_ref != g_onnx
        gap = q.abs()
    flipped = int(diff.sum())
    worst = gap[diff].max().item() / scale if flipped else 0.0
    return flipped, worst


def _output_errors(outs: list[np.ndarray], refs: list[torch.Tensor], rtol: float
                   ) -> tuple[list[str], float, float, float, float]:
    """Problems (shape, non-finite, max |err| > rtol * max|ref|) and max |err|, p99 |err|, fraction of elements
    beyond the tolerance, max |ref| of onnxruntime's outputs against reference tensors."""
    problems: list[str] = []
    if len(outs) != len(refs):
        problems.append(f"onnxruntime gives {len(outs)} outputs, PyTorch {len(refs)}")
    errs, beyond, scale = [], [], 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        r = r.float().numpy()
        if o.shape != r.shape:
            problems.append(f"output {i}: onnxruntime shape {o.shape}, PyTorch {r.shape}")
            continue
        e = np.abs(o.astype(np.float32) - r)
        s = float(np.abs(r).max()) if r.size else 0.0
        worst = float(e.max()) if e.size else 0.0
        if not np.isfinite(worst) or worst > rtol * s:
            problems.append(f"output {i}: max |err| {worst:.3g} > {rtol:g} * max|y| ({s:.3g})")
        errs.append(e.ravel())
        beyond.append((e > rtol * s).ravel())
        scale = max(scale, s)
    flat = np.concatenate(errs) if errs else np.zeros(0)
    if not flat.size:
        return problems, 0.0, 0.0, 0.0, scale
    return (problems, float(flat.max()), float(np.percentile(flat, 99)), float(np.concatenate(beyond).mean()),
            scale)


def _verify(dlgn: DLGN, run: Callable[[dict], tuple[list, list | None]],
            run_with_gates: Callable[[dict], tuple[list, list]] | None, input_names: list[str],
            examples: tuple[torch.Tensor, ...], batch: int, seed: int, rtol: float, gate_tol: float
            ) -> Verification:
    """Compare onnxruntime with PyTorch on a fresh batch (the criteria are in :func:`export_onnx`).

    ``run(feeds)`` runs the written file(s): outputs, and the gates when the files expose them.
    ``run_with_gates(feeds)`` runs the same graph with the gates as extra outputs; it is only needed (and
    only called) when the written file hides its gates and its output is not within tolerance."""
    xs = _fresh_batch(examples, batch, seed)
    feeds = {n: x.numpy() for n, x in zip(input_names, xs)}
    outs, g_np = run(feeds)
    with torch.no_grad():
        reference = dlgn.run(*(x.clone() for x in xs), hard=True)
    e2e_problems, max_abs, p99, beyond, scale = _output_errors(outs, pytree.tree_leaves(reference.output), rtol)
    figures = dict(batch=batch, provider=PROVIDER, rtol=rtol, gate_tol=gate_tol, scale=scale, max_abs=max_abs,
                   p99_abs=p99, beyond_tol=beyond)
    problems: list[str] = []
    if g_np is None:
        if not e2e_problems or run_with_gates is None:
            return Verification(**figures, value_max_abs=None, value_scale=scale, problems=e2e_problems)
        outs_g, g_np = run_with_gates(feeds)
        for i, (a, b) in enumerate(zip(outs, outs_g)):
            if a.shape != b.shape or not np.array_equal(a, b):
                problems.append(f"output {i} of the written file differs from the same graph with gate outputs")

    g_onnx = [torch.from_numpy(np.ascontiguousarray(g)) for g in g_np]
    sites, gate_problems, usable = _gate_agreement(dlgn, reference.pre_activations, reference.gates, g_onnx,
                                                   gate_tol)
    problems += gate_problems
    value_err = None
    value_scale = scale
    if usable:
        with torch.no_grad():
            cond = pytree.tree_leaves(dlgn.value_forward([x.clone() for x in xs], g_onnx))
        value_problems, value_err, _, _, value_scale = _output_errors(outs, cond, rtol)
        problems += [f"{p} (against PyTorch's value network fed onnxruntime's gates)" for p in value_problems]
    else:
        problems += e2e_problems
    return Verification(**figures, value_max_abs=value_err, value_scale=value_scale, sites=sites,
                        problems=problems)


def _gate_agreement(dlgn: DLGN, qs: Sequence[torch.Tensor], g_ref: Sequence[torch.Tensor],
                    g_onnx: Sequence[torch.Tensor], gate_tol: float) -> tuple[list[SiteAgreement], list[str], bool]:
    """Per site: how many of onnxruntime's gates differ from PyTorch's and how far from a tie. Returns the
    agreements, the problems, and whether onnxruntime's gates can be fed to PyTorch's value network."""
    sites: list[SiteAgreement] = []
    problems: list[str] = []
    usable = len(g_onnx) == len(g_ref)
    if not usable:
        problems.append(f"onnxruntime gives {len(g_onnx)} gates, PyTorch {len(g_ref)}")
    for site, q, gr, go in zip(dlgn.sites, qs, g_ref, g_onnx):
        where = f"gate {site.index} ({site.kind} at '{site.module_path or '<root>'}')"
        if go.shape != gr.shape or go.dtype != gr.dtype:
            problems.append(f"{where}: onnxruntime gives {go.dtype} {tuple(go.shape)}, PyTorch {gr.dtype} "
                            f"{tuple(gr.shape)}")
            sites.append(SiteAgreement(site.index, site.kind, site.module_path, gr.numel(), gr.numel(), math.inf))
            usable = False
            continue
        flipped, worst = _tie_gaps(site.spec, q, gr, go)
        sites.append(SiteAgreement(site.index, site.kind, site.module_path, gr.numel(), flipped, worst))
        if worst > gate_tol:
            problems.append(f"{where}: {flipped} of {gr.numel()} gates differ from PyTorch, some away from a tie "
                            f"(gap {worst:.3g} of max|q| > {gate_tol:g}): the gating graph does not compute "
                            f"PyTorch's pre-activations")
            usable = usable and math.isfinite(worst)
    return sites, problems, usable


def _check_models(targets: list[str], stage: StagedFiles, timings: dict[str, float]) -> None:
    """``onnx.checker.check_model(full_check=True)`` on each staged file."""
    import onnx

    tick = time.perf_counter()
    for target in targets:
        try:
            onnx.checker.check_model(stage.path(target), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejects the exported {os.path.basename(target)}: "
                              f"{root_message(exc)}") from exc
    timings["check"] = time.perf_counter() - tick


def _load(source: str | bytes) -> Any:
    try:
        return _session(source)
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported model: {root_message(exc)}") from exc


def _runners(targets: list[str], stage: StagedFiles, hidden_gates: Callable[[], str | bytes] | None, split: bool,
             num_outputs: int) -> tuple[Callable, Callable | None]:
    """``run(feeds) -> (outputs, gates or None)`` on the staged files, and, for a fused file that hides its gates,
    ``run_with_gates(feeds) -> (outputs, gates)`` on the same graph with gate outputs (loaded when called)."""
    sessions = [_load(stage.path(t)) for t in targets]

    def run(feeds: dict) -> tuple[list, list | None]:
        if split:
            gating, value = sessions
            gates = run_onnx(gating, _feeds_for(gating, feeds))
            names = [o.name for o in gating.get_outputs()]
            return run_onnx(value, _feeds_for(value, {**feeds, **dict(zip(names, gates))})), gates
        res = run_onnx(sessions[0], _feeds_for(sessions[0], feeds))
        return res[:num_outputs], (res[num_outputs:] if hidden_gates is None else None)

    def run_with_gates(feeds: dict) -> tuple[list, list]:
        assert hidden_gates is not None
        session = _load(hidden_gates())
        res = run_onnx(session, _feeds_for(session, feeds))
        return res[:num_outputs], res[num_outputs:]

    return run, (run_with_gates if hidden_gates is not None else None)


def check_and_verify(dlgn: DLGN, targets: list[str], stage: StagedFiles, hidden_gates: Callable[[], str | bytes] | None,
                     split: bool, input_names: list[str], num_outputs: int, examples: tuple[torch.Tensor, ...],
                     batch: int, seed: int, rtol: float, gate_tol: float, dynamic_batch: bool,
                     timings: dict[str, float]) -> Verification:
    """onnx.checker on the staged files, then :func:`_verify` with onnxruntime sessions on them; raises
    :class:`ExportError` unless the files reproduce the PyTorch model.

    ``hidden_gates``: for a fused file without gate outputs, a callable giving the same model with them
    (loaded only if needed)."""
    _check_models(targets, stage, timings)
    tick = time.perf_counter()
    run, run_with_gates = _runners(targets, stage, hidden_gates, split, num_outputs)
    try:
        verification = _verify(dlgn, run, run_with_gates, input_names, examples, batch, seed, rtol, gate_tol)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"onnxruntime failed on a batch of {batch} ({'dynamic' if dynamic_batch else 'static'} "
                          f"batch axis): {root_message(exc)}") from exc
    timings["verify"] = time.perf_counter() - tick
    if not verification.ok:
        raise ExportError(f"the exported ONNX model does not reproduce the PyTorch model; nothing was written to "
                          f"{', '.join(targets)}:\n{verification}")
    return verification

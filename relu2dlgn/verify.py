"""The numeric check a conversion runs on what it built (``convert(..., verify=True)``, the default).

**DLGN** (eval mode: batch norm with its running statistics; in train mode the gating network normalises with
batch statistics and is not affine). On random inputs ``x1``, ``x2`` shaped like the example input and
``xm = a x1 + (1 - a) x2`` (``a = 0.3``), in float64:

* every gating pre-activation is affine in the input: ``|q(xm) - (a q(x1) + (1 - a) q(x2))|_max`` is at most
  ``tol`` times the size of the pre-activation (``max(|q(x1)|, |q(x2)|, |q(xm)|)``, at least 1e-6 of the
  largest site's and 1e-12), *not* of its input-dependent part: a deep linear gating network at random init
  can carry an input-dependent part ``1e-12`` of its bias, so a relative measure of that part would be
  rounding noise;
* the value graph is affine in its value input for fixed (hard) gates, measured the same way on its outputs.

The first site (or output) that fails raises :class:`ConversionError` naming it. Sites downstream of a
nonlinearity kept with ``strict=False`` are not checked, nor is the value graph then.

**DGN**: the value graph fed the input and the DGN's own hard gates reproduces the source model on a random
input (relative error ``<= 1e-5`` of the output's size; 1e-2 for half-precision models).

Inputs: batch 1 and at most 16, else 32 positions per spatial dimension when the converted graphs accept that
(cheap; run on one intra-op thread), else the example input's shape. The three points are evaluated as one
batch of three, falling back to three calls when a graph mixes samples (the batched test fails) or does not
take the batch (a batch-wide term common to the three samples would cancel in the batched test: the
allow-list, not this check, is what excludes such ops). The graphs run in float64 under a torch function mode
that casts each op's floating-point arguments (the model is not modified, and each weight's float64 copy lives
only as long as its op); a graph with an op that has no float64 kernel is checked in its own dtype with
``tol`` 1e-3 (5e-2 in half precision). A check that no input shape lets run (the source itself fails on it)
is skipped with a warning: pass ``example_inputs``.

Failures: a converted graph that raises on an input the source model accepts is a :class:`ConversionError`
(a defect of the conversion, named as such); one specialised to another input shape
(:class:`SpecialisationError`) moves on to the next shape. The random inputs come from a private generator
(seed 0): the caller's random state is not consumed.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import ConversionError, SpecialisationError
from .utils.modes import eval_mode

log = logging.getLogger(__name__)

A = 0.3
TOL = {torch.float64: 1e-7, torch.float32: 1e-3}
HALF_TOL = 5e-2
DGN_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}  # else 1e-5
SMALL = (16, 32)  # spatial sizes tried before the example's (densenet121 needs 32: five halvings)


class _Inapplicable(Exception):
    """The check cannot run on this input shape (the graphs are specialised to another, or reject it)."""


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------

def _small(e: Any, size: int) -> Any:
    if not isinstance(e, torch.Tensor) or e.dim() == 0:
        return e
    shape = list(e.shape)
    shape[0] = 1
    if e.is_floating_point() and e.dim() >= 3:
        shape[2:] = [min(s, size) for s in shape[2:]]
    return torch.empty(shape, dtype=e.dtype, device=e.device) if e.is_floating_point() else e[:1]


def candidate_shapes(examples: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Example-like inputs to check on, cheapest first: batch 1 and small spatial sizes, then the example."""
    out: list[tuple[Any, ...]] = []
    for candidate in [tuple(_small(e, size) for e in examples) for size in SMALL] + [tuple(examples)]:
        if not any(_same_shapes(candidate, c) for c in out):
            out.append(candidate)
    return out


def _same_shapes(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return all(not isinstance(x, torch.Tensor) or x.shape == y.shape for x, y in zip(a, b))


def _random_like(examples: Sequence[Any], gen: torch.Generator) -> tuple[Any, ...]:
    """Standard normal float64 tensors shaped like the floating-point examples (the others as they are)."""
    return tuple(torch.randn(e.shape, generator=gen, dtype=torch.float64).to(e.device)
                 if isinstance(e, torch.Tensor) and e.is_floating_point() else e for e in examples)


def _mix(x1: Sequence[Any], x2: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(A * a + (1 - A) * b if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a, b in zip(x1, x2))


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------

_CONVERSIONS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.half,
                torch.Tensor.bfloat16, torch.Tensor.double}


class _Float64(TorchFunctionMode):
    """Compute every torch function in float64: floating-point arguments (inputs, weights, buffers, constants)
    are cast per call, so the model is not touched and each weight's float64 copy lives only as long as its op;
    a conversion to another floating dtype inside the graph (``q.float()``) keeps float64."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        args, kwargs = pytree.tree_map(_up, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func in _CONVERSIONS and isinstance(out, torch.Tensor) and out.is_floating_point() and \
                isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return args[0].to(out.device)
        return out


def _up(a: Any) -> Any:
    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
        return a.to(torch.float64)
    return a


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _batched(points: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    return tuple(torch.cat(xs) if isinstance(xs[0], torch.Tensor) and xs[0].dim() > 0 else xs[0]
                 for xs in zip(*points))


def _three(single: Callable[..., Any], points: Sequence[tuple[Any, ...]],
           batched: Callable[..., Any] | None = None) -> list[list[torch.Tensor]]:
    """``[leaves of single(*p) for p in points]``, from one call of ``batched`` (default ``single``) on the batch
    of the three points when its outputs split into three equal batches that pass the affinity test (a graph
    that mixes samples fails it: then, and on any error, three calls of ``single``)."""
    try:
        out = _leaves((batched or single)(*_batched(points)))
        if out and all(t.dim() > 0 and t.shape[0] % 3 == 0 for t in out):
            parts = [[t.chunk(3)[i] for t in out] for i in range(3)]
            if _worst(parts)[1] <= TOL[torch.float64]:
                return parts
    except Exception:  # a graph specialised to the batch size, or one that does not take a batch
        pass
    return [_leaves(single(*_copy(p))) for p in points]


def _size(*ys: torch.Tensor) -> float:
    return max((y.abs().max().item() for y in ys if y.numel()), default=0.0)


def _errors(parts: list[list[torch.Tensor]]) -> list[float]:
    """Each output's affinity error ``|y(xm) - (a y(x1) + (1 - a) y(x2))|_max`` relative to its size, the size
    being at least 1e-6 of the largest output's and 1e-12 (an output that is identically ~0, such as
    ``x - x.flip(-1)`` averaged, is rounding noise relative to itself). Non-finite values give ``inf``."""
    sizes = [_size(y1, y2, ym) for y1, y2, ym in zip(*parts)]
    floor = max(1e-6 * max(sizes, default=0.0), 1e-12)
    out = []
    for (y1, y2, ym), size in zip(zip(*parts), sizes):
        err = _size(ym - (A * y1 + (1 - A) * y2))
        out.append(err / max(size, floor) if err == err and size < float("inf") else float("inf"))
    return out


def _worst(parts: list[list[torch.Tensor]]) -> tuple[int, float]:
    """(index, affinity error) of the output with the largest error (the first of equals)."""
    errors = _errors(parts)
    return max(enumerate(errors), key=lambda e: e[1]) if errors else (-1, 0.0)


# --------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------

def verify(dlgn: nn.Module, source: nn.Module, examples: Sequence[Any] | None, *, unchecked_sites: set[int],
           check_value: bool) -> str:
    """Run the check for ``dlgn`` (a :class:`~relu2dlgn.DLGN` converted from ``source``) and return what was
    checked, for the conversion report. Raises :class:`ConversionError` naming the first failure."""
    if not examples:
        log.warning("conversion not verified: no example input is known; pass example_inputs to convert")
        return "not verified: no example input (pass example_inputs)"
    gen = torch.Generator().manual_seed(0)
    candidates = candidate_shapes(examples)
    for shape in candidates:
        x1, x2 = _random_like(shape, gen), _random_like(shape, gen)
        small = shape is not candidates[-1]
        try:
            with eval_mode(dlgn, source), torch.no_grad(), _one_thread(small):
                if dlgn.mode == "dgn":
                    return _check_dgn(dlgn, source, x1)
                return _check_dlgn(dlgn, source, x1, x2, unchecked_sites, check_value)
        except _Inapplicable as why:
            log.info("verification input %s not applicable (%s)", _describe(shape), why)
    log.warning("conversion not verified: neither a small input nor the example's shape runs through the model")
    return "not verified: no input shape runs through the source model (pass example_inputs)"


@contextlib.contextmanager
def _one_thread(on: bool) -> Iterator[None]:
    """Run tiny inputs on one intra-op thread: their parallel regions cost more than they compute (tens of ms
    per op on a busy 2-core machine, against ~0.1 ms)."""
    threads = torch.get_num_threads()
    if on and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _describe(xs: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, x.shape)) for x in xs if isinstance(x, torch.Tensor))


def _copy(xs: Sequence[Any]) -> tuple[Any, ...]:
    """Fresh copies of the tensors: a model may write into its input in place."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in xs)


def _source_runs(source: nn.Module, x: tuple[Any, ...]) -> bool:
    try:
        source(*_copy(x))
        return True
    except Exception:
        return False


def _guarded(f: Callable[[], Any], source: nn.Module, x: tuple[Any, ...], what: str) -> Any:
    """``f()``; an input the graphs are specialised against, or that the source rejects too, is inapplicable;
    any other failure is a defect of the conversion."""
    try:
        return f()
    except SpecialisationError as exc:
        raise _Inapplicable(str(exc).split(":")[0]) from None
    except Exception as exc:
        if not _source_runs(source, x):
            raise _Inapplicable("the source model rejects it too") from None
        raise ConversionError(
            f"verification: the converted {what} fails on a random input shaped {_describe(x)} that the source "
            f"model accepts: {type(exc).__name__}: {exc}. This is a relu2dlgn defect; please report it "
            f"(convert(..., verify=False) skips the check)") from exc


def _check_dgn(dlgn: nn.Module, source: nn.Module, x: tuple[Any, ...]) -> str:
    dtype = _param_dtype(source)
    x, tol = _to(x, dtype), DGN_TOL.get(dtype, 1e-5)
    ref = _guarded(lambda: _leaves(source(*_copy(x))), source, x, "source")
    got = _guarded(lambda: _leaves(dlgn.value(*_copy(x), *dlgn.gates_of(dlgn.gating(*_copy(x)), hard=True))),
                   source, x, "DGN")
    for i, (g, r) in enumerate(zip(got, ref)):
        err = (g - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        if not err <= tol:
            raise ConversionError(
                f"verification: the DGN does not reproduce the source model on a random input shaped {_describe(x)}"
                f" (output {i}: relative error {err:.3g} > {tol:g}). This is a relu2dlgn defect; please report "
                f"it (convert(..., verify=False) skips the check)")
    if len(got) != len(ref):
        raise ConversionError(f"verification: the DGN returns {len(got)} tensors, the source model {len(ref)}")
    return f"DGN reproduces the source (eval mode, input {_describe(x)})"


def _in_dtype(module: nn.Module, f: Callable[[torch.dtype], Any]) -> tuple[Any, torch.dtype]:
    """``f(float64)`` computed in float64, or ``f(the module's dtype)`` if an op has no float64 kernel."""
    try:
        with _Float64():
            return f(torch.float64), torch.float64
    except RuntimeError as exc:
        dtype = _param_dtype(module)
        log.info("verification in float64 failed (%s); checking in %s", exc, dtype)
        return f(dtype), dtype


def _check_dlgn(dlgn: nn.Module, source: nn.Module, x1: tuple[Any, ...], x2: tuple[Any, ...],
                unchecked: set[int], check_value: bool) -> str:
    xm = _mix(x1, x2)
    sites = dlgn.sites

    def gating(dtype: torch.dtype) -> list[list[torch.Tensor]]:
        return _three(lambda *x: tuple(dlgn.gating(*x)), [_to(p, dtype) for p in (x1, x2, xm)])

    parts, dtype = _guarded(lambda: _in_dtype(dlgn.gating, gating), source, _to(x1, _param_dtype(source)),
                            "gating graph")
    tol = TOL.get(dtype, HALF_TOL)
    worst = 0.0
    checked = [[q for i, q in enumerate(p) if i not in unchecked] for p in parts]
    indices = [i for i in range(len(parts[0])) if i not in unchecked]
    for i, err in zip(indices, _errors(checked)):
        worst = max(worst, err)
        if not err <= tol:
            s = sites[i]
            raise ConversionError(
                f"verification: the gating pre-activation of site {i} ({s.kind}, {s.op} at node '{s.node}', module "
                f"'{s.module_path or '<root>'}') is not affine in the input: relative error {err:.3g} > {tol:g} on "
                f"random inputs ({dtype}, eval mode). An op the allow-list (relu2dlgn.affine) accepts is not affine "
                f"here: please report it; convert(..., strict=False) or mode='dgn' keep such ops")
    text = (f"gating affine at {len(parts[0]) - len(unchecked)}/{len(parts[0])} sites (max rel. error {worst:.1g}, "
            f"{str(dtype).replace('torch.', '')}, eval mode, input {_describe(x1)})")
    if not check_value:
        return text + "; value graph not checked (it keeps non-gate nonlinearities)"
    return text + "; " + _check_value(dlgn, source, parts[0], x1)


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _check_value(dlgn: nn.Module, source: nn.Module, q1: list[torch.Tensor], x1: tuple[Any, ...]) -> str:
    gen = torch.Generator().manual_seed(1)
    v1, v2 = _random_like(x1, gen), _random_like(x1, gen)

    def value(dtype: torch.dtype) -> list[list[torch.Tensor]]:
        qs = [q.to(dtype) for q in q1]
        gates = dlgn.gates_of(qs, hard=True)
        gates3 = dlgn.gates_of([torch.cat([q] * 3) if q.dim() else q for q in qs], hard=True)
        points = [_to(p, dtype) for p in (v1, v2, _mix(v1, v2))]
        return _three(lambda *v: dlgn.value(*v, *gates), points, lambda *v: dlgn.value(*v, *gates3))

    parts, dtype = _guarded(lambda: _in_dtype(dlgn.value, value), source, _to(x1, _param_dtype(source)),
                            "value graph")
    i, err = _worst(parts)
    tol = TOL.get(dtype, HALF_TOL)
    if not err <= tol:
        raise ConversionError(
            f"verification: the value graph is not affine in its value input for fixed gates (output {i}: "
            f"relative error {err:.3g} > {tol:g}, {dtype}, eval mode). Please report it; "
            f"convert(..., strict=False) or mode='dgn' keep such ops")
    return f"value graph affine for fixed gates (max rel. error {err:.1g})"


def _to(xs: Sequence[Any], dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in xs)

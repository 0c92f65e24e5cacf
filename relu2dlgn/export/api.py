"""The public entry point :func:`export_onnx`: it checks the arguments, then has each step done by its module
(:mod:`.torch_export`, :mod:`.passes`, :mod:`.files`, :mod:`.verify`), and :class:`ExportOptions`, the options
that the command line sets."""
from __future__ import annotations

import copy
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, get_args

import torch
from torch.utils import _pytree as pytree

from ..dlgn import DLGN
from ..errors import ExportError, InputError, OptionError, Relu2DlgnError
from ..options import at_least, option, positive_sizes
from ..utils.modes import eval_mode
from . import files, torch_export
from .diagnostics import graph_files
from .module import ExportModule, check_ceil_mode, output_names, unique_names
from .passes import strip_outputs
from .report import ExportReport
from .torch_export import EXPORTER, batch_axes
from .verify import check_and_verify

__all__ = ["export_onnx", "split_paths", "ExportOptions", "example_inputs_for", "DEFAULT_RTOL", "DEFAULT_GATE_TOL",
           "default_tolerances", "ExportDType"]

logger = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4      # float32 and float64 models
DEFAULT_GATE_TOL = 1e-4
_EPS_FACTOR = 10         # lower precision: this many machine epsilons of the exported dtype

ExportDType = Literal["float32", "float16"]
"""The precisions :func:`export_onnx` writes (``dtype=``; also as ``torch.float32`` / ``torch.float16``)."""


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, gate_tol)`` that :func:`export_onnx` verifies a model of ``dtype`` with unless told otherwise:
    :data:`DEFAULT_RTOL` / :data:`DEFAULT_GATE_TOL` for float32 and float64, and 10 machine epsilons for a lower
    precision (float16: 9.8e-3), whose resolution alone exceeds 1e-4 of max|y|."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(DEFAULT_RTOL, _EPS_FACTOR * eps), max(DEFAULT_GATE_TOL, _EPS_FACTOR * eps)


@dataclass
class ExportOptions:
    """The options of an export that a command line or config file sets: those of :func:`export_onnx` (same
    names and defaults), and the shape of the example input that the command line makes (``batch``,
    ``input_size``)."""

    split: bool = option(False, "write a gating file and a value file (X.gating.onnx, X.value.onnx)")
    opset: int | None = option(None, "ONNX opset (default: the exporter's)", check=at_least(1))
    gates_output: bool = option(False, "also output the gates (gate_0, gate_1, ...)")
    portable: bool = option(False, "only ops that TensorRT and onnxruntime's CUDA provider accelerate: no MaxPool "
                                   "indices, gathers or ArgMax (default: the form fastest on onnxruntime's CPU)")
    dtype: ExportDType | None = option(None, "precision of the exported model (default: the model's)")
    dynamic_batch: bool = option(True, "symbolic batch axis; --no-dynamic-batch fixes it to the traced batch")
    verify: bool = option(True, "check with onnx.checker and compare onnxruntime with PyTorch (--no-verify: skip)")
    batch: int = option(2, "batch size of the example input to trace with", check=at_least(1))
    input_size: tuple[int, ...] | None = option(
        None, "C,H,W of the example input (default: the example shape saved with the model)", check=positive_sizes)


def example_inputs_for(dlgn: DLGN, batch: int = 2, input_size: Sequence[int] | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random example inputs to trace ``dlgn`` with: ``batch`` rows of the shape saved with the model
    (``dlgn.input_specs[i].example_shape``), or of ``input_size`` (one input), in the model's dtype.

    Raises :class:`ExportError` when no shape is known, naming the inputs and the remedy."""
    specs = dlgn.input_specs
    if input_size is not None:
        if len(specs) != 1:
            raise ExportError(f"input_size gives one input's shape but the model takes {len(specs)} inputs")
        shapes = [tuple(input_size)]
    else:
        missing = [s.name for s in specs if not s.example_shape]
        if missing:
            raise ExportError(f"the model records no example shape for input(s) {', '.join(missing)}; give "
                              f"input_size (--input-size C,H,W)")
        shapes = [tuple(s.example_shape[1:]) for s in specs]
    if batch < 1:
        raise ExportError(f"batch must be at least 1, got {batch}")
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((batch, *s), generator=g, dtype=dlgn.dtype) for s in shapes)


def split_paths(path: str | os.PathLike) -> tuple[str, str]:
    """The two files of ``export_onnx(..., split=True)``: ``X.gating.onnx`` and ``X.value.onnx`` for ``path``
    ``X.onnx`` (or ``X``)."""
    path = os.fspath(path)
    stem = path[:-5] if path.endswith(".onnx") else path
    return f"{stem}.gating.onnx", f"{stem}.value.onnx"


def export_onnx(
    dlgn: DLGN,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    split: bool = False,
    gates_output: bool = False,
    portable: bool = False,
    dtype: torch.dtype | ExportDType | None = None,
    verify: bool = True,
    verify_batch: int | None = None,
    rtol: float | None = None,
    gate_tol: float | None = None,
    custom_translations: dict[Callable, Callable] | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export the eval-mode (hard-gate) DLGN or DGN to ONNX, verify it with onnxruntime, and report.

    The ONNX graph maps the model's inputs to the source model's outputs (nested outputs are flattened
    to ``output_0, output_1, ...``; a single one is ``output``), with the gating graph, the gates and the
    value graph inside. The model is exported in eval mode whatever mode ``dlgn`` is in (its mode is left
    as it was). Inputs keep the names of the source model's ``forward`` arguments.

    Args:
        dlgn: a converted model (:func:`relu2dlgn.convert` or :func:`relu2dlgn.load`).
        path: the ``.onnx`` file to write. Models over 2 GiB store their weights in ``path + ".data"``.
        example_inputs: input(s) to trace with. Only the batch axis is dynamic: every other dimension is
            fixed to the example's (onnxruntime refuses other shapes), which is also how the shape
            specialisations recorded at conversion (``dlgn.report.specialised``) carry over: they are
            evaluated once, at the example's shape, during tracing. An example of batch 1 is tiled to 2
            for tracing (torch.export specialises size-1 axes).
        dynamic_batch: batch axis symbolic (``"batch"``); ``False`` fixes it to the example's.
        opset: ONNX opset (default: the exporter's), from 18 (torch.onnx implements none lower) to the newest
            the installed ``onnx`` knows (:func:`~relu2dlgn.export.torch_export.supported_opsets`); the file
            written has exactly this opset.
        split: write two files instead, ``X.gating.onnx`` (inputs -> ``gate_0 ... gate_{n-1}``) and
            ``X.value.onnx`` (inputs, ``gate_0 ...`` -> outputs; it applies ``value_input`` itself, so with
            ``"ones"`` it uses the inputs' shape only) for ``path`` = ``X.onnx``; see :func:`split_paths`.
            Feeding the gating file's outputs to the value file computes what the fused file computes.
        gates_output: also output the gates as ``gate_0 ... gate_{n-1}`` (fused file), exactly what
            ``dlgn.eval().gates(x)`` returns: boolean masks for ReLU/LeakyReLU/PReLU sites (on unless ``q <= 0``), a
            stacked ``[2, N, ...]`` boolean pair (``not q <= lo``, ``q > hi``) for ReLU6/Hardtanh, int64 per-plane
            arg-max indices for max-pool sites.
        portable: write only ops that TensorRT and onnxruntime's CUDA provider accelerate (see README, "ONNX
            export"): max-pool gates as the compare-and-select chain (``Pad``, ``Slice``, ``Greater``, ``IsNaN``,
            ``Or``, ``Where``, ``Equal``; no ``MaxPool`` indices, gathers or ``ArgMax``) and every gate applied with
            ``Where``, exact for every float. The default instead writes the form fastest on onnxruntime's CPU
            provider: max-pool gates by equality with the window maximum read with ``GatherElements``, and in
            float32 the gate applications of :func:`~relu2dlgn.export.passes.onnxruntime_cpu_gates` (exact for
            finite values; NaN pre-activations and infinite values excepted).
        dtype: precision of the exported graph (``torch.float16`` / ``"float16"``, or float32); default the
            model's. A copy of the model in that precision is exported and verified (``dlgn`` is not changed);
            gates are decided on that precision's pre-activations (see README, "Half precision"). A graph in a
            precision other than float32 always has the portable form.
        verify: check the written model (see below); ``False`` skips the check.
        verify_batch: batch size of the verification batch (default: the traced batch + 1; with
            ``dynamic_batch=False`` it must be, and defaults to, the traced batch).
        rtol: tolerance of the value-network check, relative to max |output| (default ``None``: by the exported
            dtype, :func:`default_tolerances`: 1e-4 for float32, 9.8e-3 for float16).
        gate_tol: how close to a tie a gate that differs between backends must be, relative to max |q| of
            its site (default ``None``: by the exported dtype, as ``rtol``).
        custom_translations: passed to torch.onnx as ``custom_translation_table`` ({torch op: onnxscript
            function}) for ops without a built-in ONNX lowering.
        seed: seed of the verification batch.

    Verification (``verify=True``): ``onnx.checker.check_model(full_check=True)`` on every file, then
    onnxruntime (CPU) on a fresh random batch whose batch size differs from the traced one (so the batch
    axis really is dynamic), compared with the PyTorch model in eval mode:

    * **gates**: a gate is a discontinuous function of its pre-activation, so where ``q`` is within rounding
      of a tie (0 for ReLU, lo/hi for Hardtanh, two equal elements of a max-pool window) the two backends
      may legitimately pick different pieces, and one flipped gate can move the output by far more than
      rounding. An output comparison (max or any quantile) can therefore neither pass every correct export
      nor fail every wrong one. Instead every gate that differs must sit at a tie: its distance from the
      tie in PyTorch's pre-activation (``|q|``, ``|q - lo|``, ``|q - hi|`` or the gap between the two
      window elements) must be at most ``gate_tol * max|q|`` of its site. A gating graph that computes
      something else flips gates away from ties and fails.
    * **value network**: onnxruntime's output must equal PyTorch's value network *fed onnxruntime's gates*
      to ``rtol * max|output|`` (max over all elements: with the gates fixed, the computation is
      continuous, so the max is the right statistic).
    * when the fused file has no gate outputs, a copy with gate outputs is what runs the checks above, and
      the written file must reproduce its outputs bit for bit.

    The report also shows the plain end-to-end error against ``dlgn(x)`` (max, 99th percentile, fraction of
    elements beyond ``rtol * max|output|``) and how many gates flipped; these figures include tie flips and
    are informative, not pass/fail criteria.

    Files are written to a temporary directory next to ``path`` and moved into place only after
    verification, with ``os.replace``: an error (including a failed verification) leaves no file at
    ``path``, and an existing file there is replaced only by a verified one; an unwritable directory is
    detected before exporting and writes nothing.

    Returns:
        an :class:`ExportReport` (``print(report)``: errors, op histogram, file sizes, opset, names).

    Raises:
        OptionError: ``opset`` outside the range this exporter writes (the message gives the range).
        InputError: the example inputs do not fit the model (rank, dtype, device) or it cannot run on them.
        ExportError: the path cannot be written, torch.export or the ONNX translation fails (the message
            names the DLGN's fx node and module, and the op without ONNX lowering), or verification fails
            (the message has the figures).
    """
    start = time.perf_counter()
    _check_opset(opset)
    dlgn, example_inputs = _in_dtype(dlgn, example_inputs, dtype)
    examples, verify_batch = _checked_examples(dlgn, example_inputs, dynamic_batch, verify_batch)
    by_dtype = default_tolerances(dlgn.dtype)
    rtol = by_dtype[0] if rtol is None else rtol
    gate_tol = by_dtype[1] if gate_tol is None else gate_tol
    path = os.fspath(path)
    targets = list(split_paths(path)) if split else [path]
    timings: dict[str, float] = {}
    with files.staged(targets) as stage:
        with eval_mode(dlgn):
            exported = _export_parts(dlgn, examples, targets, split=split, gates_output=gates_output,
                                     portable=portable, dynamic_batch=dynamic_batch, opset=opset,
                                     custom_translations=custom_translations, timings=timings)
            described = files.write(exported.protos, stage, dlgn, timings)
            with_gates = None
            if exported.restore_gates is not None:
                with_gates = functools.partial(exported.runnable_with_gates, stage.extra("with_gates.onnx"))
            verification = None
            if verify:
                verification = check_and_verify(dlgn, targets, stage, with_gates, split, exported.input_names,
                                                exported.num_outputs, examples, verify_batch, seed, rtol, gate_tol,
                                                dynamic_batch, timings)
            del exported, with_gates  # the ModelProtos: freed before the files are moved into place
        stage.commit()
    logger.info("exported %s in %.1f s (%s)", ", ".join(targets), time.perf_counter() - start,
                ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return ExportReport(files=described, mode=dlgn.mode, value_input=dlgn.value_input, pool=dlgn.pool,
                        num_sites=len(dlgn.sites), dynamic_batch=dynamic_batch,
                        example_shapes=[tuple(x.shape) for x in examples], gates_output=gates_output and not split,
                        split=split, exporter=EXPORTER, seconds=time.perf_counter() - start,
                        verification=verification, timings=timings, portable=portable,
                        dtype=str(dlgn.dtype).replace("torch.", ""))


def _in_dtype(dlgn: DLGN, example_inputs: Any, dtype: torch.dtype | str | None) -> tuple[DLGN, Any]:
    """The model and its floating-point example inputs in ``dtype`` (a copy of the model when it differs)."""
    if dtype is None:
        return dlgn, example_inputs
    names = {"float32": torch.float32, "float16": torch.float16}
    target = names.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if target not in names.values():
        raise OptionError(f"dtype must be one of {', '.join(get_args(ExportDType))} (or torch.float32 / "
                          f"torch.float16), got {dtype!r}")
    if not isinstance(dlgn, DLGN) or dlgn.dtype == target:
        converted = dlgn
    else:
        converted = copy.deepcopy(dlgn).to(target)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return converted, tuple(x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                            for x in example_inputs)


def _check_opset(opset: int | None) -> None:
    if opset is None:
        return
    lo, hi = torch_export.supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise OptionError(f"opset={opset!r}: this exporter writes ONNX opsets {lo} to {hi} (torch.onnx implements "
                          f"none below {lo}; the installed onnx knows none above {hi})")


def _checked_examples(dlgn: DLGN, example_inputs: torch.Tensor | Sequence[torch.Tensor], dynamic_batch: bool,
                      verify_batch: int | None) -> tuple[tuple[torch.Tensor, ...], int]:
    """The example inputs to trace with (a batch of 1 tiled to 2 for a dynamic batch axis) and the verification
    batch size; :class:`ExportError` for what cannot be exported."""
    if not isinstance(dlgn, DLGN):
        raise ExportError(f"export_onnx expects a relu2dlgn DLGN, got {type(dlgn).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    examples = tuple(example_inputs)
    dlgn.check_inputs(examples)
    check_ceil_mode(dlgn, examples)
    if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in examples):
        raise ExportError("example_inputs must be tensors with a leading batch axis")
    if dlgn.device.type != "cpu":
        raise ExportError(f"export_onnx needs the model on the CPU (it is on {dlgn.device}); call dlgn.cpu() and "
                          f"pass CPU example inputs")
    batch0 = examples[0].shape[0]
    if dynamic_batch and batch0 == 1:
        examples = tuple(torch.cat([x, x]) for x in examples)
        batch0 = 2
    if verify_batch is None:
        verify_batch = batch0 + 1 if dynamic_batch else batch0
    elif not dynamic_batch and verify_batch != batch0:
        raise ExportError(f"with dynamic_batch=False the model takes batches of exactly {batch0}; "
                          f"verify_batch={verify_batch} cannot run")
    return examples, verify_batch


@dataclass
class _Exported:
    """The exported ModelProto(s) with their targets and parts, and the ONNX names."""

    protos: list[tuple[str, str, Any]]  # (target, part, ModelProto)
    input_names: list[str]
    num_outputs: int
    restore_gates: Callable[[], None] | None = None  # puts back the gate outputs a fused file does not expose

    def runnable_with_gates(self, beside: str) -> str | bytes:
        """The fused model with its gate outputs, for onnxruntime (see :func:`files.runnable`)."""
        assert self.restore_gates is not None
        self.restore_gates()
        return files.runnable(self.protos[0][2], beside)


def _export_parts(dlgn: DLGN, examples: tuple[torch.Tensor, ...], targets: list[str], *, split: bool,
                  gates_output: bool, portable: bool, dynamic_batch: bool, opset: int | None,
                  custom_translations: dict | None, timings: dict[str, float]) -> _Exported:
    """Export the fused model, or the gating and value parts (``split``); ``dlgn`` is in eval mode."""
    input_names = unique_names([s.name for s in dlgn.input_specs])
    gate_names = [f"gate_{i}" for i in range(len(dlgn.sites))]
    try:
        with torch.no_grad():
            example = dlgn.run(*examples, hard=True)
    except Relu2DlgnError:
        raise
    except Exception as exc:  # the model's own complaint about the example (channels, sizes)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"the model cannot run on example input(s) of shape "
                         f"{', '.join(str(tuple(x.shape)) for x in examples)} ({type(exc).__name__}: {text})") from None
    leaves = pytree.tree_leaves(example.output)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise ExportError(f"the model's outputs must be tensors (possibly nested in tuples, lists or dicts) "
                          f"to become ONNX outputs; got {[type(t).__name__ for t in leaves]}")
    out_names = output_names(example.output)
    batch = torch.export.Dim("batch") if dynamic_batch else None
    in_shapes = tuple({0: batch} for _ in examples) if batch is not None else None
    # The default form is for float32 on onnxruntime's CPU provider: its max-pool gate compares the window maximum
    # with the window's elements, which needs both computed in one precision, and onnxruntime runs a float16 graph
    # in float32 between casts it inserts where it lacks float16 kernels; other precisions get the portable form.
    portable = portable or dlgn.dtype != torch.float32
    export = functools.partial(torch_export.export_part, opset=opset, custom_translations=custom_translations,
                               files=graph_files(dlgn), timings=timings, portable=portable)
    if split:
        ep, gating = export(ExportModule(dlgn, "gating"), examples, in_shapes, input_names, gate_names,
                            what="gating graph")
        gate_shapes = tuple({a: batch} if a is not None else None for a in batch_axes(ep))
        _, value = export(ExportModule(dlgn, "value"), examples + tuple(example.gates),
                          in_shapes + gate_shapes if batch is not None else None,
                          input_names + gate_names, out_names, what="value graph")
        return _Exported([(targets[0], "gating", gating), (targets[1], "value", value)], input_names,
                         len(out_names))
    _, fused = export(ExportModule(dlgn, "fused", gates_output=True), examples, in_shapes, input_names,
                      out_names + gate_names, what="DLGN")
    restore = None if gates_output else strip_outputs(fused, set(gate_names))
    return _Exported([(targets[0], "fused", fused)], input_names, len(out_names), restore)

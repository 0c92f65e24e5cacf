"""What :func:`~relu2dlgn.export.export_onnx` returns: the files written and the verification figures."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["OnnxFile", "SiteAgreement", "Verification", "ExportReport"]



@dataclass
class OnnxFile:
    """One written ONNX file."""

    path: str
    size: int
    opset: int
    inputs: list[str]
    outputs: list[str]
    ops: dict[str, int]


@dataclass
class SiteAgreement:
    """How the onnxruntime gates of one site compare with PyTorch's on the verification batch."""

    index: int
    kind: str
    module_path: str
    total: int
    flipped: int
    worst_tie: float  # max over flipped gates of the tie gap / max|q| of the site (0 if none flipped)


@dataclass
class Verification:
    """Figures of onnxruntime vs PyTorch on a fresh batch (see :func:`export_onnx`)."""

    batch: int
    provider: str
    rtol: float
    gate_tol: float
    scale: float          # max |PyTorch output|
    max_abs: float        # end to end: onnxruntime vs dlgn(x)
    p99_abs: float
    beyond_tol: float     # fraction of output elements with |err| > rtol * scale
    value_max_abs: float | None  # onnxruntime output vs PyTorch's value network fed onnxruntime's gates
    value_scale: float
    sites: list[SiteAgreement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def gates_total(self) -> int:
        return sum(s.total for s in self.sites)

    @property
    def gates_flipped(self) -> int:
        return sum(s.flipped for s in self.sites)

    @property
    def worst_tie(self) -> float:
        return max((s.worst_tie for s in self.sites), default=0.0)

    def __str__(self) -> str:
        rel = lambda v, s: f"{v:.3g} ({v / s:.2g} of max|y|)" if s > 0 else f"{v:.3g}"  # noqa: E731
        lines = [
            f"verified with onnxruntime ({self.provider}) on a fresh batch of {self.batch}: "
            + ("OK" if self.ok else "FAILED"),
            f"  output vs PyTorch          max |err| {rel(self.max_abs, self.scale)}, "
            f"p99 |err| {rel(self.p99_abs, self.scale)}, beyond {self.rtol:g}*max|y|: {self.beyond_tol:.3%}",
        ]
        if self.value_max_abs is not None:
            lines.append(f"  value net at ORT's gates   max |err| {rel(self.value_max_abs, self.value_scale)} "
                         f"(limit {self.rtol:g} of max|y|)")
        if not self.sites:
            lines.append("  gates                      not compared: the output is within tolerance")
        else:
            flips = f"  gates                      {self.gates_flipped} of {self.gates_total} differ"
            if self.gates_flipped:
                flips += (f", {'all' if self.worst_tie <= self.gate_tol else 'NOT all'} at ties (worst gap "
                          f"{self.worst_tie:.2g} of max|q|, limit {self.gate_tol:g})")
            lines.append(flips)
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well it reproduces PyTorch. ``print(report)`` shows it all."""

    files: list[OnnxFile]
    mode: str
    value_input: str
    pool: str
    num_sites: int
    dynamic_batch: bool
    example_shapes: list[tuple[int, ...]]
    gates_output: bool
    split: bool
    exporter: str
    seconds: float
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)
    portable: bool = False
    dtype: str = "float32"

    @property
    def path(self) -> str:
        """The fused file, or the gating file of a split export."""
        return self.files[0].path

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def opset(self) -> int:
        return self.files[0].opset

    @property
    def max_abs_error(self) -> float | None:
        return self.verification.max_abs if self.verification else None

    @property
    def p99_abs_error(self) -> float | None:
        return self.verification.p99_abs if self.verification else None

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.example_shapes)
        steps = ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items())
        lines = [f"relu2dlgn ONNX export ({self.exporter}, {self.seconds:.1f} s{': ' + steps if steps else ''}): "
                 f"mode={self.mode} "
                 f"value_input={self.value_input} pool={self.pool}, {self.dtype}, "
                 f"{'portable' if self.portable else 'onnxruntime-CPU'} gate forms, {self.num_sites} gate sites, "
                 f"traced at {shapes}, batch axis {'dynamic' if self.dynamic_batch else 'static'}"]
        for f in self.files:
            ops = ", ".join(f"{k} {v}" for k, v in sorted(f.ops.items(), key=lambda kv: (-kv[1], kv[0])))
            lines += [f"{f.path}: {_human(f.size)}, opset {f.opset}, {sum(f.ops.values())} nodes",
                      f"  inputs:  {', '.join(f.inputs)}",
                      f"  outputs: {_short_list(f.outputs)}",
                      f"  ops:     {ops}"]
        lines.append(str(self.verification) if self.verification else "not verified (verify=False)")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _short_list(names: Sequence[str], keep: int = 8) -> str:
    if len(names) <= keep:
        return ", ".join(names)
    return ", ".join(names[:keep - 2]) + f", ... ({len(names)} in all), " + names[-1]


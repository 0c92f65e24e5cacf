"""``relu2dlgn export SAVED_DIR --out FILE.onnx``: the command-line front end of :func:`relu2dlgn.export.export_onnx`.

Kept apart from the library (which never parses arguments or prints); :mod:`relu2dlgn.cli` registers it.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from .errors import ExportError
from .export import export_onnx

__all__ = ["add_export_parser", "cmd_export"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must look like 3,224,224, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--input-size must be positive sizes like 3,224,224, got {text!r}")
    return dims


def add_export_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``relu2dlgn export`` on an ``add_subparsers()`` object."""
    p = sub.add_parser("export", help="export a saved DLGN to ONNX (verified with onnxruntime)",
                       description="Export a model saved with dlgn.save(DIR) to ONNX, verify it with onnxruntime "
                                   "and print the report.")
    p.add_argument("saved_dir", help="directory written by dlgn.save()")
    p.add_argument("--out", required=True, help="the .onnx file (with --split: X.gating.onnx and X.value.onnx)")
    p.add_argument("--split", action="store_true", help="write a gating file and a value file")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--gates-output", action="store_true", help="also output the gates (gate_0, gate_1, ...)")
    p.add_argument("--input-size", type=_shape, default=None,
                   help="C,H,W of the example input (default: the example shape saved with the model)")
    p.add_argument("--batch", type=int, default=2, help="batch size to trace with (default 2)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch")
    p.add_argument("--no-verify", action="store_true", help="skip onnx.checker and the onnxruntime comparison")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """``relu2dlgn export``: load, export, verify, print the report."""
    from .dlgn import load

    dlgn = load(args.saved_dir)
    specs = dlgn.input_specs
    if args.input_size is not None:
        if len(specs) != 1:
            raise ExportError(f"--input-size gives one input's shape but the model takes {len(specs)} inputs")
        shapes = [tuple(args.input_size)]
    else:
        missing = [s.name for s in specs if not s.example_shape]
        if missing:
            raise ExportError(f"{args.saved_dir} records no example shape for input(s) {', '.join(missing)}; "
                              f"pass --input-size C,H,W")
        shapes = [tuple(s.example_shape[1:]) for s in specs]
    if args.batch < 1:
        raise ExportError(f"--batch must be at least 1, got {args.batch}")
    dtype = dlgn.dtype
    g = torch.Generator().manual_seed(0)
    examples = tuple(torch.randn((args.batch, *s), generator=g, dtype=dtype) for s in shapes)
    report = export_onnx(dlgn, args.out, examples, dynamic_batch=not args.static_batch, opset=args.opset,
                         split=args.split, gates_output=args.gates_output, verify=not args.no_verify)
    print(report)
    return 0

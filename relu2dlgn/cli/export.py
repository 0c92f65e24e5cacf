"""``relu2dlgn export DIR --out FILE.onnx``: export a saved DLGN to ONNX, verified with onnxruntime."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from ..dlgn import load
from ..errors import InputError, OptionError
from ..export import ExportOptions, example_inputs_for, export_onnx
from ..options import group, option
from .args import add_command, resolve, shape_flag


@dataclass
class ExportCommand:
    saved_dir: str | None = option(None, "directory written by dlgn.save() (or a run's model/)", flags=("saved_dir",))
    out: str | None = option(None, "the .onnx file (with --split: X.gating.onnx and X.value.onnx)")
    export: ExportOptions = group(ExportOptions, "export")

    def check(self) -> None:
        if not self.saved_dir or not self.out:
            raise OptionError("export needs the saved model directory (SAVED_DIR) and --out FILE.onnx")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "export", ExportCommand, run, help="export a saved DLGN to ONNX (verified with onnxruntime)",
                       description="Export a model saved with dlgn.save(DIR) to ONNX, verify it with onnxruntime "
                                   "and print the report.")


def run(args: argparse.Namespace) -> int:
    cmd = resolve(ExportCommand, args)
    dlgn = load(cmd.saved_dir)
    o = cmd.export
    examples = example_inputs_for(dlgn, o.batch, o.input_size)
    kwargs = {k: v for k, v in dataclasses.asdict(o).items() if k not in ("batch", "input_size")}
    try:
        report = export_onnx(dlgn, cmd.out, examples, **kwargs)
    except InputError as exc:
        if o.input_size is None:
            raise
        raise InputError(f"{shape_flag(o.input_size)}: {exc}") from None
    print(report)
    return 0

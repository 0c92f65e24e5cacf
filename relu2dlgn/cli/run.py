"""``relu2dlgn run``: the main job — train (or load) a ReLU network, convert, fine-tune, export, verify, report."""
from __future__ import annotations

import argparse
from typing import Any

from ..pipeline import RunConfig, run as run_pipeline
from .args import add_command, resolve


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "run", RunConfig, run,
                       help="the whole product in one command: source -> DLGN -> fine-tune -> ONNX -> report",
                       description="Train a small ReLU network on the offline digits (or load --checkpoint), "
                                   "convert it, fine-tune the DLGN with distillation, export and verify it in ONNX, "
                                   "write the report, and print a closing table. Artifacts go to --out "
                                   "(default runs/<name>); --resume continues a broken run.",
                       skip=("out_dir", "resume"), flags={"model": ("--model",)})


def run(args: argparse.Namespace) -> int:
    result = run_pipeline(resolve(RunConfig, args))
    print(result.table())
    return 0

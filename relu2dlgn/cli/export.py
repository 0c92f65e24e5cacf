"""``relu2dlgn export DIR --out FILE.onnx``: export a saved DLGN to ONNX, verified with onnxruntime."""
from __future__ import annotations

import argparse
from typing import Any

from ..export import add_export_parser


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return add_export_parser(sub)

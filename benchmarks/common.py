"""What the benchmark scripts share: the machine line written next to every figure, and the JSON result file."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from relu2dlgn.utils.fs import atomic_write_text
from relu2dlgn.utils.machine import cpu_name


def machine() -> str:
    """CPU model, core count, torch threads and version: the line each result file and table carries."""
    threads = torch.get_num_threads()
    return f"{cpu_name()} ({os.cpu_count()} cores), {threads} torch thread(s), torch {torch.__version__}"


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` (its directory made if needed), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")

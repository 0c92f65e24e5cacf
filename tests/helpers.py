"""Helpers shared by the tests (one definition each): error measures, history comparison, the CLI runner,
affinity checks."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

FAST = {"progress": False}  # fine-tuning options for tests: no progress bars


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def outputs(y: Any) -> tuple:
    return y if isinstance(y, tuple) else (y,)


def assert_affine(f: Callable, x1: torch.Tensor, x2: torch.Tensor, a: float = 0.3, tol: float = 1e-8) -> None:
    """f(a x1 + (1-a) x2) == a f(x1) + (1-a) f(x2) for every output (use float64)."""
    mixed = f(a * x1 + (1 - a) * x2)
    for m, y1, y2 in zip(outputs(mixed), outputs(f(x1)), outputs(f(x2))):
        assert rel_err(m, a * y1 + (1 - a) * y2) <= tol


def comparable(history: Sequence[dict]) -> list[dict]:
    """Per-epoch records without the wall-clock fields (what two equivalent runs share bit for bit)."""
    drop = {"time", "throughput", "epoch_time"}
    return [{k: v for k, v in r.items() if k not in drop} for r in history]


def run_cli(argv: Sequence[str]) -> int:
    """``relu2dlgn ARGV`` in this process; returns the exit code (relu2dlgn errors: 2)."""
    from relu2dlgn.cli import main
    return main(list(argv))


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}

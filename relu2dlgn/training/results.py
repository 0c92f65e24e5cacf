"""What a fine-tuning run returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .metrics import best_epoch


@dataclass
class FinetuneResult:
    """What :func:`relu2dlgn.finetune` returns. ``history`` holds the per-epoch records also written to
    ``metrics.jsonl`` (epoch 0: before training); ``summary`` is a one-line description of the run."""

    history: list[dict[str, Any]]
    best_val_acc: float | None
    best_epoch: int | None
    out_dir: str | None
    summary: str

    @classmethod
    def of(cls, history: list[dict[str, Any]], out_dir: str | None, summary: str) -> "FinetuneResult":
        acc, epoch = best_epoch(history)
        return cls(list(history), acc, epoch, out_dir, summary)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record."""
        return self.history[-1] if self.history else {}

"""Per-epoch metrics: accumulated on the device during an epoch, reduced over processes, written to
``metrics.jsonl`` (one JSON line per epoch) and summarised in one line."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..utils.fs import append_line, atomic_write_text
from .distributed import all_reduce_sum

_PARTS = ("loss", "ce", "kd", "gate")


class EpochSums:
    """Sums over an epoch's batches (loss terms and correct predictions weighted by batch size, agreeing
    gate decisions per matched site), kept on the device until :meth:`reduce`."""

    def __init__(self, num_pairs: int, device: torch.device):
        self.sums = torch.zeros(len(_PARTS) + 2, device=device, dtype=torch.float64)  # + correct, count
        self.agree = torch.zeros(num_pairs, device=device, dtype=torch.float64)
        self.decisions = torch.zeros(num_pairs, device=device, dtype=torch.float64)

    @torch.no_grad()
    def add(self, parts: dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        for k, key in enumerate(_PARTS):
            if key in parts:
                self.sums[k] += parts[key].double() * n
        self.sums[4] += (logits.argmax(1) == y).sum()
        self.sums[5] += n

    @torch.no_grad()
    def add_agreement(self, agree: torch.Tensor, decisions: torch.Tensor) -> None:
        self.agree += agree
        self.decisions += decisions

    def reduce(self) -> "EpochSums":
        for t in (self.sums, self.agree, self.decisions):
            all_reduce_sum(t)
        return self

    @property
    def count(self) -> float:
        return self.sums[5].item()

    def mean(self, part: str) -> float:
        return self.sums[_PARTS.index(part)].item() / max(self.count, 1.0)

    def accuracy(self) -> float:
        return self.sums[4].item() / max(self.count, 1.0)

    def agreement(self) -> float | None:
        total = self.decisions.sum().item()
        return self.agree.sum().item() / total if total > 0 else None

    def agreement_per_site(self) -> list[float]:
        return [round(a / max(t, 1.0), 5) for a, t in zip(self.agree.tolist(), self.decisions.tolist())]


class MetricsFile:
    """``metrics.jsonl`` in ``out_dir`` (or nothing when ``out_dir`` is ``None``)."""

    def __init__(self, out_dir: str | None, name: str = "metrics.jsonl"):
        self.path = os.path.join(out_dir, name) if out_dir else None

    def rewrite(self, history: list[dict[str, Any]]) -> None:
        if self.path:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in history))

    def append(self, record: dict[str, Any]) -> None:
        if self.path:
            append_line(self.path, json.dumps(record))


def format_record(rec: dict[str, Any]) -> str:
    """One line for an epoch's record."""
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "val_gate_agreement", "beta", "throughput")
    return f"epoch {rec['epoch']}: " + " ".join(
        f"{k}={rec[k]:.4g}" for k in keys if isinstance(rec.get(k), (int, float)))


def best_epoch(history: list[dict[str, Any]]) -> tuple[float | None, int | None]:
    """The best validation accuracy and its (earliest) epoch."""
    vals = [(r["val_acc"], r["epoch"]) for r in history if "val_acc" in r]
    if not vals:
        return None, None
    acc, epoch = max(vals, key=lambda t: (t[0], -t[1]))
    return acc, epoch


def summary_line(history: list[dict[str, Any]], epochs: int, steps: int, elapsed: float,
                 model_dir: str | None) -> str:
    """``relu2dlgn finetune: 3 epoch(s), 63 steps, val_acc 0.9978 (hard gates; best ...), ...``."""
    best, at = best_epoch(history)
    final = history[-1] if history else {}
    parts = [f"relu2dlgn finetune: {epochs} epoch(s), {steps} steps"]
    if "val_acc" in final:
        parts.append(f"val_acc {final['val_acc']:.4f} (hard gates; best {best:.4f} at epoch {at})")
    if "val_gate_agreement" in final:
        parts.append(f"gate agreement {final['val_gate_agreement']:.4f}")
    if "throughput" in final:
        parts.append(f"{final['throughput']:.0f} img/s")
    parts.append(f"{elapsed:.1f}s")
    if model_dir:
        parts.append(f"model: {model_dir}")
    return ", ".join(parts)

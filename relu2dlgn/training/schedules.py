"""Per-step schedules: the soft-gate sharpness ``beta`` and the learning-rate factor."""
from __future__ import annotations

import math

from .config import BetaSchedule


def beta_at(step: int, total: int, start: float, end: float, schedule: BetaSchedule) -> float:
    """Soft-gate sharpness at optimiser step ``step`` of ``total``: ``start`` → ``end`` along ``schedule``
    (``"geometric"``: ``start (end/start)^f``; ``"linear"``: ``start + (end - start) f``; ``f = step/(total-1)``)."""
    if schedule == "constant" or total <= 1:
        return start
    f = min(max(step / (total - 1), 0.0), 1.0)
    if schedule == "geometric":
        return start * (end / start) ** f
    return start + (end - start) * f


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    f = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(f, 1.0)))

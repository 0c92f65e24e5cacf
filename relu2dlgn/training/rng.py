"""Random streams: seeding a fresh run and saving/restoring every stream a resumed run must continue."""
from __future__ import annotations

import random
from typing import Any

import torch


def seed_all(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's random streams: torch (CPU and CUDA), Python, numpy, and a loader's own generator."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "loader" in state and loader_generator is not None:
        loader_generator.set_state(state["loader"])

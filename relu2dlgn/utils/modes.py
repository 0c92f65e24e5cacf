"""Train/eval flags: the one place that saves and restores them."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def preserved_modes(*modules: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit, exactly as it was (a root in train mode with some
    children in eval mode stays so), whatever the body does to them."""
    flags = {m: m.training for root in modules for m in root.modules()}
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run the body with ``modules`` in eval mode, then restore every submodule's flag."""
    with preserved_modes(*modules):
        for m in modules:
            m.eval()
        yield

"""Fixtures of the fine-tuning tests: one intra-op thread, a slice of the real digits, a small source net."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from relu2dlgn.data import load_data


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, and on a busy machine
    spinning OpenMP threads slow them down by an order of magnitude."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """A small slice of the real digits at 16x16: 192 training and 64 validation images."""
    data = load_data("digits", image_size=16)
    return Subset(data.train, range(192)), Subset(data.val, range(64))


"""utils.threads: the job's thread rule and the context that restores torch's count."""
from __future__ import annotations

import pytest
import torch

from relu2dlgn.utils.threads import job_device, job_threads, torch_threads


def test_thread_rule():
    assert job_threads(None, torch.device("cpu")) == 1
    assert job_threads(4, torch.device("cpu")) == 4
    assert job_threads(None, torch.device("cuda")) is None
    assert job_device("cpu") == torch.device("cpu")


def test_torch_threads_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before

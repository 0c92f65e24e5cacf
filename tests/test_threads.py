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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_job_device_refuses_cuda_where_there_is_none():
    from relu2dlgn.errors import OptionError
    with pytest.raises(OptionError, match=r"device='cuda': CUDA is not available here"):
        job_device("cuda")
    assert job_device(None) == torch.device("cpu")

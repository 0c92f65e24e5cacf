"""Fixtures of the experiments' tests: the tiny budget (TinyNet on 12-px digits, one seed, one short epoch), one
intra-op thread, and a setup shared by the module (the source trained once)."""
from __future__ import annotations

import pytest
import torch

from relu2dlgn.experiments import ExperimentConfig, Setup
from relu2dlgn.options import from_flat

# TinyNet, 12-px digits, 1 seed, 1 epoch on 192 training examples, 1 source epoch, small kernels
TINY = dict(model="_models:TinyNet", image_size=12, seeds=1, epochs=1, source_epochs=1, train_examples=192,
            progress=False, recalibrate_bn=1, npk_examples=12, threads=1)


def tiny_config(**changes) -> ExperimentConfig:
    return from_flat(ExperimentConfig, **{**TINY, **changes})


def tiny_setup(out, **changes) -> Setup:
    changes = {**TINY, **changes}
    return Setup(tiny_config(**changes), str(out), given=set(changes))


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """The tiny configs set one intra-op thread (tiny models; a busy machine); the other tests get theirs back.
    Module-scoped and autouse, so that it is set up before (and torn down after) the module's ``setup``."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny setup shared by a test module: its source network is trained once."""
    return tiny_setup(tmp_path_factory.mktemp("experiments"))

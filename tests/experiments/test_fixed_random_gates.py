"""fixed_gates / random_gates: the frozen gating network is bit for bit the learnt (or random) one after
training, the value network starts from an independent fresh init, and the files and rows are written."""
from __future__ import annotations

import json
import os

import torch

from _models import TinyNet
from relu2dlgn import experiments as E
from relu2dlgn.experiments.random_gates import GATING_SEED
from relu2dlgn.experiments.runs import finetuned, gating_of, reinit_value


def _equal_states(a: dict, b: dict) -> bool:
    return set(a) <= set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _gating(state: dict) -> dict:
    return {k[len("gating."):]: v for k, v in state.items() if k.startswith("gating.")}


def test_fixed_gates_trains_the_value_network_on_frozen_learnt_gates(setup):
    result = E.fixed_gates(setup=setup)
    seed = setup.cfg.seed_list()[0]
    source = {k: v.clone() for k, v in setup.source.state_dict().items()}
    dgn_run = setup.memoised(("value on gates", "learnt", "dgn", seed))
    dlgn_run = setup.memoised(("value on gates", "learnt", "dlgn", seed))
    # learnt source gates: the gating network is the source network itself, untouched by training
    assert _equal_states(_gating(dgn_run.model.state_dict()), source)
    # learnt DLGN gates: the fine-tuned DLGN's gating network, untouched by training
    learnt = finetuned(setup, seed).model
    assert _equal_states(_gating(dlgn_run.model.state_dict()), _gating(learnt.state_dict()))
    # ... while the value network is not the source's (re-initialised and trained)
    value = {k[len("value."):]: v for k, v in dgn_run.model.state_dict().items() if k.startswith("value.")}
    assert not _equal_states(value, source)
    assert [h["epoch"] for h in dgn_run.history] == [0, 1]
    assert [r.name for r in result.rows][2:] == ["learnt source gates (frozen) + value net from scratch",
                                                "learnt DLGN gates (frozen) + value net from scratch"]
    saved = json.load(open(os.path.join(setup.out, "fixed_gates.json")))
    assert saved["rows"][2]["values"] == [dgn_run.accuracy] and os.path.exists(result.figure)
    assert "frozen" in saved["protocol"] and "seeds" in saved["protocol"]


def test_the_value_network_is_reinitialised_from_an_independent_fresh_init(setup):
    dgn = gating_of(setup, "learnt", "dgn")
    model = reinit_value(dgn, setup, seed=7)
    torch.manual_seed(7)
    reference = TinyNet(num_classes=10).state_dict()     # the same architecture, built independently
    value = {k[len("value."):]: v for k, v in model.state_dict().items() if k.startswith("value.")}
    assert _equal_states(value, reference)
    assert _equal_states(_gating(model.state_dict()), setup.source.state_dict())


def test_random_gates_freezes_a_random_init_bit_for_bit(setup):
    result = E.random_gates(setup=setup)
    seed = setup.cfg.seed_list()[0]
    torch.manual_seed(GATING_SEED + seed)
    reference = TinyNet(num_classes=10).state_dict()      # the random gating network, built independently
    for mode in ("dgn", "dlgn"):
        run = setup.memoised(("value on gates", "random", mode, GATING_SEED + seed, seed))
        assert _equal_states(_gating(run.model.state_dict()), reference), mode
        assert run.model.mode == mode
    assert [r.name for r in result.rows] == ["random ReLU gates (frozen) + value net from scratch",
                                             "random linear gates (frozen) + value net from scratch",
                                             "learnt source gates (frozen) + value net from scratch"]
    assert result.agrees in (True, False) and "points below learnt gates" in result.verdict

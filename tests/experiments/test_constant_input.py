"""constant_input: the value network of the constant-input model receives only ones — in every training step and
in evaluation — while its gating network, and the value network of the x model, receive the images."""
from __future__ import annotations

import sys

import torch
import torch.fx as fx

from conftest import tiny_setup
from relu2dlgn import experiments as E
from relu2dlgn.experiments.constant_input import INPUT_ROW, ONES_ROW

CONVERT = sys.modules["relu2dlgn.convert"]  # the module (the package's `convert` is the function)


def test_the_constant_input_model_receives_only_ones(setup, tmp_path, monkeypatch):
    # a setup of its own (its runs are trained here, under the hook), with the shared setup's trained source
    own = tiny_setup(tmp_path, checkpoint=setup.source_record()["weights"])
    seen: list[tuple[int, torch.Tensor]] = []
    proving = []  # the conversion's numeric proof probes the value graph with other inputs on purpose

    def verify(*args, **kwargs):
        proving.append(True)
        try:
            return real_verify(*args, **kwargs)
        finally:
            proving.pop()

    real_verify = CONVERT.verify_conversion
    monkeypatch.setattr(CONVERT, "verify_conversion", verify)

    def record(module, args):
        if not proving and isinstance(module, fx.GraphModule) and args and isinstance(args[0], torch.Tensor):
            seen.append((id(module), args[0].detach().clone()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = E.constant_input(setup=own)
    finally:
        handle.remove()
    seed = own.cfg.seed_list()[0]
    ones = own.memoised(("finetuned", "ones", seed)).model
    with_x = own.memoised(("finetuned", "input", seed)).model
    assert ones.value_input == "ones" and with_x.value_input == "input"
    to_ones = [t for m, t in seen if m == id(ones.value)]
    steps = len(own.train_loader)
    assert len(to_ones) >= steps                                     # every training step (and evaluation)
    assert all(torch.equal(t, torch.ones_like(t)) for t in to_ones)
    gating_inputs = [t for m, t in seen if m == id(ones.gating)]
    assert gating_inputs and all(t.std() > 0.1 for t in gating_inputs)     # the gating network sees the images
    x_inputs = [t for m, t in seen if m == id(with_x.value)]
    assert x_inputs and all(t.std() > 0.1 for t in x_inputs)
    assert [r.name for r in result.rows][1:] == [INPUT_ROW, ONES_ROW]

"""Named regression tests for bugs that the generated-architecture properties (test_generated.py) found."""
from __future__ import annotations

import operator

import torch
from torch import nn

import relu2dlgn
from _generated import GenNet, Plan


def test_inplace_gate_on_the_input_does_not_corrupt_the_value_input():
    """Found by hypothesis: an in-place activation applied to the model's input. The DGN gating graph ran it
    first and mutated the caller's tensor, so the value graph saw an already-activated input (rel. error 3%).
    The gating graph now clones inputs that its in-place ops could mutate."""
    plan = Plan(in_chans=1, size=6, steps=[("stash",), ("gate", "leaky", "module_inplace"), ("head", 2)], planted=1)
    model = GenNet(plan).eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        ref = model(x.clone())
        dgn = relu2dlgn.convert(model, mode="dgn").eval()
        x_in = x.clone()
        dgn.gates(x_in)
        assert torch.equal(x_in, x)                      # the gating network leaves the input alone
        assert torch.allclose(dgn(x.clone()), ref, rtol=1e-6, atol=1e-7)


def test_inplace_relu_on_input_module():
    """An in-place ReLU module on the model's input: the DGN equals the source, and the DLGN equals its closed
    form (gating: q0 = x, q1 = conv(x); value: v1 = conv(relu(x)) * 1(conv(x) > 0)). Like the source, both leave
    relu(x) in the caller's tensor (the value graph keeps the in-place op); the gating graph must not have
    changed it before the value graph reads it."""
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(1, 2, 1), nn.ReLU()).eval()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    conv = model[1]
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.3, -0.2]))
        ref = model(x.clone())
        dlgn_ref = conv(torch.relu(x)) * (conv(x) > 0).float()
        for mode, expected in (("dgn", ref), ("dlgn", dlgn_ref)):
            d = relu2dlgn.convert(model, mode=mode).eval()
            x_in = x.clone()
            out = d(x_in)
            assert torch.equal(x_in, torch.relu(x))
            assert torch.allclose(out, expected, rtol=1e-6, atol=1e-7), mode
        assert not torch.allclose(dlgn_ref, ref)        # the two references differ, so each check bites


def test_augmented_assignment_on_an_alias_stays_in_place():
    """Found by hypothesis: `x += s` where `s` aliases `x`. torch.fx proxies have no __iadd__, so plain
    symbolic tracing records `x + s` and the alias never sees the update (rel. error 6%). The tracer now
    records operator.iadd."""
    plan = Plan(in_chans=1, size=6, steps=[("conv", 2, 1, 1), ("conv", 2, 1, 1), ("stash",), ("iadd", 0), ("add", 0),
                                          ("gate", "relu", "functional"), ("head", 2)], planted=1)
    model = GenNet(plan).eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        ref = model(x)
        assert not torch.allclose(torch.fx.symbolic_trace(model)(x), ref)      # the torch.fx behaviour
        for mode in ("dgn", "dlgn"):
            d = relu2dlgn.convert(model, mode=mode).eval()
            assert any(n.target is operator.iadd for n in d.value.graph.nodes)
        assert torch.allclose(relu2dlgn.convert(model, mode="dgn").eval()(x), ref, rtol=1e-6, atol=1e-7)


def test_onnx_export_refuses_ceil_mode_window_that_pytorch_drops(tmp_path):
    """Found by hypothesis: MaxPool2d(1, 2, ceil_mode=True) on an even size. PyTorch drops the last window
    (it would start past the input), ONNX keeps it: onnx.checker then rejected the file with a shape error.
    export_onnx now refuses such a site up front, naming it and the remedy."""
    import pytest
    plan = Plan(in_chans=2, size=10, steps=[("gate", "relu", "module"), ("bn",),
                                           ("gate", "maxpool", "module", (1, 2, 0, 1, True)),
                                           ("conv", 2, 1, 1), ("gate", "relu", "module"), ("head", 2)], planted=3)
    dlgn = relu2dlgn.convert(GenNet(plan).eval(), mode="dgn").eval()
    with pytest.raises(relu2dlgn.ExportError, match=r"max-pool site 1 .*ceil_mode=True with kernel 1, stride 2"):
        relu2dlgn.export_onnx(dlgn, str(tmp_path / "m.onnx"), example_inputs=(torch.randn(2, 2, 10, 10),))
    assert list(tmp_path.iterdir()) == []

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


class _Overflowing(nn.Module):
    """Half precision, with weights that overflow pre-activations to +-inf: relu(-inf) = 0 and hardtanh(+-inf) =
    +-1 in the source, so its output is a finite number."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(4, 1)
        self.relu, self.ht = nn.ReLU(), nn.Hardtanh(-1.0, 1.0)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [-1e4, 0.0]]))
            self.fc2.weight.copy_(torch.tensor([[1e4, 0.0], [-1e4, 0.0]]))
            for fc in (self.fc1, self.fc2):
                fc.bias.zero_()
            self.out.weight.fill_(1.0)
            self.out.bias.zero_()

    def forward(self, x):
        return self.out(torch.cat([self.relu(self.fc1(x)), self.ht(self.fc2(x))], 1))


def test_dgn_reproduces_the_source_at_infinite_pre_activations():
    """Found by another issue: in half precision a pre-activation overflowed to -inf, and the DGN applied its gate as
    ``v * 1(q > 0)`` = ``-inf * 0`` = NaN where the source's relu gives 0 (likewise hardtanh at +-inf). Hard gates
    are now boolean and applied with ``where``, which selects the piece instead of multiplying by it."""
    model = _Overflowing().half().eval()
    x = torch.tensor([[10.0, 1.0]], dtype=torch.half)
    with torch.no_grad():
        q = model.fc1(x)
        assert torch.isinf(q).any() and torch.isinf(model.fc2(x)).all()
        ref = model(x)
        assert torch.isfinite(ref).all()
        dgn = relu2dlgn.convert(model, mode="dgn", value_input="input").eval()
        assert torch.equal(dgn(x), ref)


def test_train_mode_batch_of_zero_examples():
    """Found by another issue: a batch of 0 examples in train mode crashed the soft max-pool gate (pool_windows
    viewed 0 elements with an inferred -1 axis). It now returns an empty output, as the source network does."""
    from _models import TinyNet
    model = TinyNet().eval()
    dlgn = relu2dlgn.convert(model, example_inputs=(torch.randn(2, 3, 16, 16),)).train()
    x = torch.randn(0, 3, 16, 16)
    out = dlgn(x)
    assert out.shape == model.train()(x).shape == (0, 10)

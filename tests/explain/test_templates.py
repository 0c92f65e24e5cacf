"""Gate templates reproduce the gating network's pre-activations (<w, x> + b) on random inputs, for every site of
models with every gate form; a DGN is refused unless a point is given, and then the local map is exact there."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import relu2dlgn
from _models import AllForms, TinyNet, randomize_bn
from relu2dlgn import explain
from relu2dlgn.errors import ExplainError, OptionError

D = torch.float64


def _picked(q: torch.Tensor, T: explain.Templates) -> torch.Tensor:
    return q[(slice(None), T.units, *T.position)] if q.dim() > 2 else q[:, T.units]


@pytest.mark.parametrize("make", [TinyNet, AllForms])
def test_templates_reproduce_every_site(make):
    torch.manual_seed(0)
    model = randomize_bn(make()).to(D).eval()
    x = torch.randn(5, 3, 12, 12, dtype=D) * 2
    dlgn = relu2dlgn.convert(model, example_inputs=x[:2]).eval()
    qs = dlgn.pre_activations(x)
    for site in range(len(dlgn.sites)):
        T = explain.gate_templates(dlgn, site, chunk=4)
        assert T.weights.shape == (qs[site].shape[1], 3, 12, 12) and not T.local
        torch.testing.assert_close(T.apply(x), _picked(qs[site], T), rtol=1e-10, atol=1e-10)


def test_position_units_and_linear_sites():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).to(D).eval()
    x = torch.randn(7, 6, dtype=D)
    dlgn = relu2dlgn.convert(model, example_inputs=x[:2]).eval()
    T = explain.gate_templates(dlgn, 1, units=[3, 0])
    W = model[2].weight @ model[0].weight                      # the linear gating chain, by hand
    b = model[2].weight @ model[0].bias + model[2].bias
    torch.testing.assert_close(T.weights, W[[3, 0]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T.bias, b[[3, 0]], rtol=1e-12, atol=1e-12)
    conv = relu2dlgn.convert(randomize_bn(TinyNet()).to(D).eval(), example_inputs=torch.randn(2, 3, 10, 10, dtype=D))
    T = explain.gate_templates(conv, 0, position=(0, 9), units=[2])
    q = conv.eval().pre_activations(x2 := torch.randn(3, 3, 10, 10, dtype=D))[0][:, 2, 0, 9]
    torch.testing.assert_close(T.apply(x2)[:, 0], q, rtol=1e-10, atol=1e-10)
    assert T.weights[0, :, :, :6].abs().max() == 0  # a corner unit sees only its receptive field (3x3 at (0, 9))


def test_dgn_is_refused_or_local():
    torch.manual_seed(0)
    dgn = relu2dlgn.convert(randomize_bn(TinyNet()).to(D).eval(), "dgn",
                            example_inputs=torch.randn(2, 3, 10, 10, dtype=D)).eval()
    with pytest.raises(ExplainError, match="depend on the input; pass at=x"):
        explain.gate_templates(dgn, 2)
    x = torch.randn(1, 3, 10, 10, dtype=D)
    T = explain.gate_templates(dgn, 2, at=x)
    assert T.local
    torch.testing.assert_close(T.apply(x), _picked(dgn.pre_activations(x)[2], T), rtol=1e-10, atol=1e-10)
    near = x + 1e-7 * torch.randn_like(x)  # same linear region: the local map still holds
    torch.testing.assert_close(T.apply(near), _picked(dgn.pre_activations(near)[2], T), rtol=1e-8, atol=1e-8)


def test_bad_requests():
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.raises(OptionError, match="site=3 is out of range: this model has 3 gate sites"):
        explain.gate_templates(dlgn, 3)
    with pytest.raises(OptionError, match="position"):
        explain.gate_templates(dlgn, 0, position=(8, 0))
    with pytest.raises(OptionError, match="units"):
        explain.gate_templates(dlgn, 0, units=[8])
    with pytest.raises(ExplainError, match="converted model"):
        explain.gate_templates(TinyNet(), 0)

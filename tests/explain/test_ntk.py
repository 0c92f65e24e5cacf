"""The value network's tangent kernel: equal to J J^T from autograd example by example; at random init of a
fully-connected DLGN its expectation is d sigma^(2(d-1)) times the NPK (measured), which fails for weights that
are not independent."""
from __future__ import annotations

import torch
from torch import nn

import relu2dlgn
from _models import TinyNet, randomize_bn
from relu2dlgn import explain

D = torch.float64


def test_ntk_equals_autograd_jacobians():
    torch.manual_seed(0)
    dlgn = relu2dlgn.convert(randomize_bn(TinyNet(num_classes=3)).to(D).eval(),
                             example_inputs=torch.randn(2, 3, 8, 8, dtype=D)).eval()
    x = torch.randn(5, 3, 8, 8, dtype=D)
    params = list(dlgn.value.parameters())
    rows = []
    for i in range(5):
        out = dlgn.run(x[i:i + 1], hard=True).output[0]
        rows.append(torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(out[k], params,
                                                                                     retain_graph=True)])
                                 for k in range(3)]))
    J = torch.stack(rows)                                           # (n, C, P)
    ref = torch.einsum("icp,jcp->ij", J, J)
    torch.testing.assert_close(explain.ntk(dlgn, x, chunk=2), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explain.ntk(dlgn, x[:2], x[2:]), ref[:2, 2:], rtol=1e-10, atol=1e-10)
    only_fc = explain.ntk(dlgn, x, params=["fc"])
    Jfc = J[:, :, -(16 * 3 + 3):]                                   # fc.weight, fc.bias are the last parameters
    torch.testing.assert_close(only_fc, torch.einsum("icp,jcp->ij", Jfc, Jfc), rtol=1e-10, atol=1e-10)


def test_ntk_is_proportional_to_npk_in_expectation_at_init():
    """E[Theta] = d sigma^(2(d-1)) K for d = 3 weight layers, i.i.d. N(0, sigma^2) value weights, fixed gates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 128, bias=False), nn.ReLU(), nn.Linear(128, 128, bias=False), nn.ReLU(),
                          nn.Linear(128, 2, bias=False)).to(D).eval()
    x = torch.randn(8, 6, dtype=D)
    dlgn = relu2dlgn.convert(model, example_inputs=x[:2]).eval()
    K = explain.npk(dlgn, x, bias="none", dtype=D)
    sigma, draws = 0.5, 120
    g = torch.Generator().manual_seed(1)
    mean = torch.zeros(8, 8, dtype=D)
    for _ in range(draws):
        with torch.no_grad():
            for p in dlgn.value.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=D) * sigma)
        mean += explain.ntk(dlgn, x) / draws
    predicted = 3 * sigma ** 4 * K
    assert ((mean - predicted).norm() / predicted.norm()).item() < 0.05
    with torch.no_grad():  # not i.i.d. zero-mean: every weight +sigma -> no longer proportional
        for p in dlgn.value.parameters():
            p.fill_(sigma)
    theta = explain.ntk(dlgn, x)
    ratio = theta / predicted
    assert (ratio.max() - ratio.min()).item() > 0.5

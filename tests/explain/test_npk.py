"""The neural path kernel against independent references: the closed form / recursion of fully-connected nets
(computed from the weights by hand), explicit path counting with dense 0/1 edge matrices on a conv net, and
symmetry / positive semi-definiteness on real conv nets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from _models import TinyNet, randomize_bn
from relu2dlgn import explain
from relu2dlgn.errors import ExplainError, InputError

D = torch.float64


def mlp(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(*layers)).to(D).eval()


def dlgn_of(model: nn.Module, x: torch.Tensor, **kw) -> relu2dlgn.DLGN:
    return relu2dlgn.convert(model, example_inputs=x[:2], **kw).eval()


def gram(a: torch.Tensor) -> torch.Tensor:
    return a.flatten(1) @ a.flatten(1).T


def test_fully_connected_closed_form_without_biases():
    """K = C <x, x'> prod_l <g_l(x), g_l(x')>, gates from the linear gating chain computed by hand."""
    m = mlp(nn.Linear(5, 9, bias=False), nn.ReLU(), nn.Linear(9, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False))
    x = torch.randn(6, 5, dtype=D)
    q1 = x @ m[0].weight.T
    q2 = q1 @ m[2].weight.T
    ref = 3 * gram(x) * gram((q1 > 0).to(D)) * gram((q2 > 0).to(D))
    d = dlgn_of(m, x)
    torch.testing.assert_close(explain.npk(d, x, bias="none", dtype=D), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(explain.npk(d, x, bias="paths", dtype=D), ref, rtol=1e-12, atol=0)  # no bias units
    torch.testing.assert_close(explain.npk(d, x), ref, rtol=1e-6, atol=0)  # float32 off-diagonal pairs


def test_fully_connected_with_biases_and_batch_norm():
    """bias="paths": S_0 = <x, x'>, S_l = <g_l, g_l'> (S_{l-1} + #additive terms of layer l), K = C (S_L + 1);
    a batch norm's shift is one more additive term, its scale a weight (1). bias="none": the closed form."""
    m = mlp(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
            nn.Linear(6, 2))
    x = torch.randn(7, 4, dtype=D)
    q1 = m[1](m[0](x))
    q2 = m[4](m[3](q1))
    o1, o2 = gram((q1 > 0).to(D)), gram((q2 > 0).to(D))
    S = o1 * (gram(x) + 2)        # linear bias + batch-norm shift
    S = o2 * (S + 1)              # batch-norm shift only
    d = dlgn_of(m, x)
    torch.testing.assert_close(explain.npk(d, x, dtype=D), 2 * (S + 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(explain.npk(d, x, bias="none", dtype=D), 2 * gram(x) * o1 * o2, rtol=1e-12, atol=0)


def test_leaky_and_hardtanh_gates_are_slopes_and_constants_are_bias_paths():
    """leaky: the gate is the slope s in {a, 1}: <s, s'>. ReLU6: slope 1(0 < q <= 6) and, with bias="paths",
    the constant pieces add (1-g0)(1-g0') + g1 g1' per unit."""
    m = mlp(nn.Linear(4, 8), nn.LeakyReLU(0.1), nn.Linear(8, 6), nn.ReLU6(), nn.Linear(6, 3))
    with torch.no_grad():
        m[2].weight.mul_(8)  # some units saturate above 6
    x = torch.randn(9, 4, dtype=D) * 3
    q1 = m[0](x)
    q2 = m[2](q1)
    s1 = (q1 > 0).to(D) + 0.1 * (q1 <= 0).to(D)
    g0, g1 = (q2 > 0).to(D), (q2 > 6).to(D)
    assert g1.sum() > 0 and (1 - g0).sum() > 0
    S = gram(s1) * (gram(x) + 1)
    S = gram(g0 - g1) * (S + 1) + gram(1 - g0) + gram(g1)
    d = dlgn_of(m, x)
    torch.testing.assert_close(explain.npk(d, x, dtype=D), 3 * (S + 1), rtol=1e-12, atol=0)
    ref_none = 3 * gram(x) * gram(s1) * gram(g0 - g1)
    torch.testing.assert_close(explain.npk(d, x, bias="none", dtype=D), ref_none, rtol=1e-12, atol=0)


def test_value_input_ones_starts_every_path_at_one():
    m = mlp(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 2, bias=False))
    x = torch.randn(5, 5, dtype=D)
    g = (x @ m[0].weight.T > 0).to(D)
    d = dlgn_of(m, x, value_input="ones")
    torch.testing.assert_close(explain.npk(d, x, dtype=D), 2 * 5 * gram(g), rtol=1e-12, atol=0)


def test_soft_gates_enter_as_numbers():
    m = mlp(nn.Linear(3, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
    x = torch.randn(4, 3, dtype=D)
    d = dlgn_of(m, x, beta=2.0)
    s = torch.sigmoid(2.0 * (x @ m[0].weight.T))
    torch.testing.assert_close(explain.npk(d, x, hard=False, dtype=D), 2 * gram(x) * gram(s), rtol=1e-12, atol=0)


class ConvPaths(nn.Module):
    """conv -> relu -> max-pool -> conv -> relu -> (+ avg-pooled skip) -> global average -> linear, no biases."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.relu(self.c2(h)) + F.avg_pool2d(h, 3, 1, 1)
        return self.fc(h.mean((2, 3)))


def _edges(fn, shape) -> torch.Tensor:
    """The 0/1 edge matrix of a linear map with unit coefficients (its Jacobian, (out, in))."""
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(shape)).flatten(), torch.zeros(
        torch.Size(shape).numel(), dtype=D)).ne(0).to(D)


def test_conv_net_equals_explicit_path_counting():
    """K = 1^T E_fc E_gap (D2 E_c2 + E_avg) P D1 E_c1 (x * x'): each E a 0/1 edge matrix (every kernel tap and
    pooling-window element one edge), D the gate products, P the max-pool edges both examples select."""
    torch.manual_seed(1)
    m = ConvPaths().to(D).eval()
    x = torch.randn(5, 1, 6, 6, dtype=D)
    d = dlgn_of(m, x)
    w1, w2 = torch.ones(2, 1, 3, 3, dtype=D), torch.ones(2, 2, 3, 3, dtype=D)
    E1 = _edges(lambda v: F.conv2d(v, w1, padding=1), (1, 1, 6, 6))
    E2 = _edges(lambda v: F.conv2d(v, w2, padding=1), (1, 2, 3, 3))
    Eavg = _edges(lambda v: F.avg_pool2d(v, 3, 1, 1), (1, 2, 3, 3))
    Egap = _edges(lambda v: v.sum((2, 3)), (1, 2, 3, 3))
    Efc = torch.ones(2, 2, dtype=D)  # every output unit sees every channel
    q1 = m.c1(x)
    idx = F.max_pool2d(q1, 2, return_indices=True)[1].flatten(1)  # gating: q1 itself (relu removed)
    q2 = m.c2(F.avg_pool2d(q1, 2))                                   # gating: max-pool -> average stand-in
    ref = torch.zeros(5, 5, dtype=D)
    for i in range(5):
        for j in range(5):
            D1 = torch.diag(((q1[i] > 0) & (q1[j] > 0)).flatten().to(D))
            P = torch.zeros(18, 72, dtype=D)
            rows = torch.arange(18)
            same = idx[i] == idx[j]
            P[rows[same], (idx[i] + 36 * (rows // 9))[same]] = 1  # channel c's flat index is within its plane
            D2 = torch.diag(((q2[i] > 0) & (q2[j] > 0)).flatten().to(D))
            path = torch.ones(1, 2, dtype=D) @ Efc @ Egap @ (D2 @ E2 + Eavg) @ P @ D1 @ E1
            ref[i, j] = (path @ (x[i] * x[j]).flatten()).item()
    torch.testing.assert_close(explain.npk(d, x, dtype=D), ref, rtol=1e-12, atol=0)


class Functional(nn.Module):
    """The same fully-connected net written with parameters, matmul, a scaling, a subtraction and a mean."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 6, dtype=D))
        self.w2 = nn.Parameter(torch.randn(6, 3, dtype=D))

    def forward(self, x):
        h = torch.relu((x @ self.w1) * 0.5)
        return (h @ self.w2 - h[:, :3]).mean(1, keepdim=True)


def test_functional_ops_become_unit_edges():
    """x @ W -> x @ ones, * 0.5 -> * 1, a - b -> a + b, mean over 3 columns -> sum: unit j reaches the single
    output through 3 matmul edges plus, for j < 3, the subtracted edge, so K = <x, x'> sum_j c_j g_j g_j' with
    c_j = 3 + [j < 3]; an op whose edges are unknown (cumsum) is refused by name."""
    torch.manual_seed(0)
    m = Functional().eval()
    x = torch.randn(5, 4, dtype=D)
    g = (x @ m.w1 > 0).to(D)
    c = torch.tensor([4.0, 4, 4, 3, 3, 3], dtype=D)
    ref = gram(x) * ((g * c) @ g.T)
    torch.testing.assert_close(explain.npk(dlgn_of(m, x), x, dtype=D), ref, rtol=1e-12, atol=0)

    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.relu(x).cumsum(1)

    with pytest.raises(ExplainError, match="node 'cumsum' .* it is not a known linear op"):
        explain.npk(dlgn_of(Cumulative(), x), x)


def test_conv_nets_symmetric_psd_and_consistent_blocks():
    torch.manual_seed(0)
    m = randomize_bn(TinyNet()).eval()
    x = torch.randn(10, 3, 12, 12)
    d = dlgn_of(m, x)
    K = explain.npk(d, x, chunk=7)
    assert K.dtype == D and torch.equal(K, K.T)
    Kn = explain.cosine_normalize(K)
    assert torch.linalg.eigvalsh(Kn).min() > -1e-6
    torch.testing.assert_close(explain.npk(d, x[:4], x[4:], chunk=5), K[:4, 4:], rtol=1e-5, atol=0)
    torch.testing.assert_close(K, explain.npk(d, x, dtype=D), rtol=1e-5, atol=0)
    assert d.training is False and all(p.dtype == torch.float32 for p in d.parameters())  # model unchanged


def test_timm_resnet_psd():
    from _models import build
    m = build("timm:resnet10t")
    x = torch.randn(6, 3, 32, 32)
    K = explain.npk(dlgn_of(m, x), x)
    assert torch.equal(K, K.T) and torch.linalg.eigvalsh(explain.cosine_normalize(K)).min() > -1e-6


def test_kernel_alignment_reference():
    K = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=D)
    y = torch.tensor([0, 0, 1])
    T = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=D)
    assert explain.kernel_alignment(K, y) == pytest.approx(float((K * T).sum() / (K.norm() * T.norm())))


def test_errors():
    m = mlp(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 3, dtype=D)
    with pytest.raises(ExplainError, match="needs a converted model"):
        explain.npk(m, x)
    with pytest.raises(InputError, match="rank"):
        explain.npk(dlgn_of(m, x), x[0])

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h * torch.sigmoid(h))

    d = relu2dlgn.convert(Gated().to(D).eval(), example_inputs=x[:2], strict=False)
    with pytest.raises(ExplainError, match="sigmoid"):
        explain.npk(d, x)

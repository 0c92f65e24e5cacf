"""Gate agreement against the gates computed by hand from TinyNet's layers (source: its ReLU network; DLGN:
the same layers without activations and with average pooling in place of max-pooling)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from _models import TinyNet, randomize_bn
from relu2dlgn import explain
from relu2dlgn.errors import InputError


def test_agreement_equals_hand_computed_gates():
    torch.manual_seed(0)
    src = randomize_bn(TinyNet()).eval()
    x = torch.randn(12, 3, 8, 8)
    dlgn = relu2dlgn.convert(src, example_inputs=x[:2]).eval()
    with torch.no_grad():
        dlgn.gating.conv2.weight.add_(0.3 * torch.randn_like(dlgn.gating.conv2.weight))  # make them differ more
        s0 = src.bn1(src.conv1(x))
        s2 = src.bn2(src.conv2(F.max_pool2d(F.relu(s0), 2)))
        d0 = dlgn.gating.bn1(dlgn.gating.conv1(x))
        d2 = dlgn.gating.bn2(dlgn.gating.conv2(F.avg_pool2d(d0, 2)))
        out_s, out_d = src(x), dlgn(x)
    idx_s = F.max_pool2d(F.relu(s0), 2, return_indices=True)[1]   # the source pools its activated tensor
    idx_d = F.max_pool2d(d0, 2, return_indices=True)[1]
    same = [(s0 > 0) == (d0 > 0), idx_s == idx_d, (s2 > 0) == (d2 > 0)]
    ref = [s.double().mean() for s in same]
    agree = explain.gate_agreement(dlgn, src, [(x[:5], None), (x[5:], None)])
    for site, r in zip(agree.sites, ref):
        assert site.agreement == pytest.approx(float(r), abs=1e-12)
    assert agree.overall == pytest.approx(float(sum(s.sum() for s in same)) / sum(s.numel() for s in same))
    assert agree.predictions == float((out_s.argmax(1) == out_d.argmax(1)).double().mean())
    assert src.training is False and dlgn.training is False


def test_dgn_agrees_with_its_source_everywhere():
    torch.manual_seed(0)
    src = randomize_bn(TinyNet()).eval()
    x = torch.randn(6, 3, 8, 8)
    dgn = relu2dlgn.convert(src, "dgn", example_inputs=x[:2]).eval()
    agree = explain.gate_agreement(dgn, src, [x])
    assert [s.agreement for s in agree.sites] == [1.0, 1.0, 1.0] and agree.predictions == 1.0


def test_mismatched_source():
    x = torch.randn(2, 3, 8, 8)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=x)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(InputError, match="do not match the DLGN's"):
        explain.gate_agreement(dlgn, other, [x])
    with pytest.raises(InputError, match="source must be the nn.Module"):
        explain.gate_agreement(dlgn, "resnet", [x])

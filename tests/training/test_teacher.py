"""relu2dlgn.training.teacher: the source's output and pre-activations in one pass; site matching."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from _models import source_net
from relu2dlgn.training import TeacherTap, match_sites


def test_teacher_tap_is_source_output_and_preactivations():
    model = source_net()
    x = torch.randn(3, 3, 16, 16)
    tap = TeacherTap(model)
    dgn = relu2dlgn.convert(model, mode="dgn").eval()
    with torch.no_grad():
        out, qs = tap(x)
        ref_qs = dgn.pre_activations(x)
        ref = model(x)
    assert torch.equal(out, ref)
    assert len(qs) == len(ref_qs) == 3  # relu, maxpool, relu (the in-place ReLU module called twice)
    for a, b in zip(qs, ref_qs):
        assert torch.equal(a, b)
    assert (qs[0] < 0).any()  # a clone before the in-place ReLU, not its output
    assert tap.site_nodes == [s.node for s in dgn.sites]
    # the tap is a view of the source (its very parameters, no copy) and leaves every train/eval flag alone
    source_params = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in tap.parameters()} == source_params and len(source_params) == 10
    model.train()
    model.bn1.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    with torch.no_grad():
        out2, _ = tap(x)
    assert {name: m.training for name, m in model.named_modules()} == flags   # restored exactly
    assert torch.equal(out2, ref)                                              # and it ran in eval mode


def test_teacher_tap_leaves_the_batch_alone():
    class InPlaceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x.relu_()  # mutates the caller's batch
            return self.conv(x).relu().mean((2, 3))

    x = torch.randn(2, 3, 8, 8)
    keep = x.clone()
    tap = TeacherTap(InPlaceFirst().eval())
    assert tap.mutates_input and not TeacherTap(source_net()).mutates_input
    out, qs = tap(x)
    assert torch.equal(x, keep) and len(qs) == 2


def test_match_sites_by_name_and_clear_error():
    model = source_net()
    dlgn_avg = relu2dlgn.convert(model, pool="avg")  # no max-pool site
    tap = TeacherTap(model)
    assert match_sites(dlgn_avg, tap.site_nodes, tap.site_kinds) == [(0, 0), (1, 2)]

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.relu(self.conv(x)).mean((2, 3))

    other = TeacherTap(Other())
    with pytest.raises(relu2dlgn.InputError, match=r"teacher's gate sites do not match.*site 1 \(relu 'relu_1'"):
        match_sites(dlgn_avg, other.site_nodes, other.site_kinds)


def test_teacher_targets_are_the_source_hard_gates():
    """targets=True: the tap returns each site's hard gate (what dgn.gates gives: masks, max-pool indices) in the
    same forward pass, and the output is still the source's; the in-place ReLU's mask is taken before it runs."""
    model = source_net()
    x = torch.randn(3, 3, 16, 16)
    tap = TeacherTap(model, targets=True)
    dgn = relu2dlgn.convert(model, mode="dgn").eval()
    with torch.no_grad():
        out, gates = tap(x)
        ref_gates = dgn.gates(x)
        assert torch.equal(out, model(x))
    assert [g.dtype for g in gates] == [torch.bool, torch.int64, torch.bool]
    for a, b in zip(gates, ref_gates):
        assert torch.equal(a, b)


def test_site_terms_from_teacher_gates_equal_those_from_pre_activations():
    from relu2dlgn.training import site_gate_terms

    model = source_net()
    x = torch.randn(3, 3, 16, 16)
    dlgn = relu2dlgn.convert(model).train()
    with torch.no_grad():
        _, qt = TeacherTap(model)(x)
        _, gt = TeacherTap(model, targets=True)(x)
        qs = dlgn.pre_activations(x)
    pairs = match_sites(dlgn, TeacherTap(model).site_nodes, TeacherTap(model).site_kinds)
    for i, j in pairs:
        a = site_gate_terms(dlgn.gate_specs[i], qs[i], qt[j], 3.0)
        b = site_gate_terms(dlgn.gate_specs[i], qs[i], gt[j], 3.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]

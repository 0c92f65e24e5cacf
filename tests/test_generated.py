"""Property tests on generated architectures (see _generated.py): for every generated model, DGN exactness,
DLGN affinity (gating in the input, value in the value input) and the planted site count."""
from __future__ import annotations

import torch
from hypothesis import given, settings

import relu2dlgn
from _generated import GenNet, Plan, plans
from _models import rel_err


def _outs(y):
    return y if isinstance(y, tuple) else (y,)


def _input(plan: Plan, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, plan.in_chans, plan.size, plan.size, generator=g).to(dtype)


def _affine(f, x1, x2, a=0.3, tol=1e-8):
    mixed = f(a * x1 + (1 - a) * x2)
    for m, y1, y2 in zip(_outs(mixed), _outs(f(x1.clone())), _outs(f(x2.clone()))):
        ref = a * y1 + (1 - a) * y2
        assert (m - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@given(plans())
def test_generated_models(plan):
    model = GenNet(plan).eval()
    x = _input(plan)
    with torch.no_grad():
        ref = model(x.clone())
        dgn = relu2dlgn.convert(model, mode="dgn", value_input="input").eval()
        assert len(dgn.sites) == plan.planted
        for a, b in zip(_outs(dgn(x.clone())), _outs(ref)):
            assert rel_err(a, b) <= 1e-5 or (a - b).abs().max() <= 1e-6

        dlgn = relu2dlgn.convert(model, mode="dlgn").eval().double()
        assert len(dlgn.sites) == plan.planted
        x64, x2 = _input(plan, dtype=torch.float64), _input(plan, seed=1, dtype=torch.float64)
        _affine(lambda t: dlgn.pre_activations(t), x64, x2)
        gates = dlgn.gates(x64.clone())
        _affine(lambda v: dlgn.value(v, *gates), x64, x2)

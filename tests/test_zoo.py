"""A fixed sample of the timm / torchvision registries (benchmarks/zoo_sweep.py runs all of it), including the four
models an earlier sweep failed on although timm's own fx feature extraction traces them: efficientvit_b2
(autocast with a traced device type inside LiteMLA), efficientvit_m3 and tiny_vit_11m_224 (a buffer torch.fx
adds without a proxy), nest_tiny_jx at its native 224 px (MaxPool2dSame, which pads before it pools, was read
as a plain max-pool: a raw AssertionError inside the converted graph).

References: timm's fx extraction (does it trace), the activation / max-pool calls an eager forward makes (the
site count), the source model's output (DGN exactness) and the numerical affinity test (strict DLGN).
"""
from __future__ import annotations

import pytest
import torch

import relu2dlgn
from _models import build
from test_affine import TOL, affinity_error
from test_convert import eager_gate_calls

# spec, input size, strict DLGN built (True) or refused (False)
SAMPLE = [
    ("timm:efficientvit_b2", 64, False),
    ("timm:efficientvit_m3", 224, False),
    ("timm:tiny_vit_11m_224", 224, False),
    ("timm:nest_tiny_jx", 224, False),
    ("timm:resnet10t", 64, True),
    ("timm:mobilenetv3_small_050", 64, False),
    ("timm:regnetx_002", 64, True),
    ("tv:squeezenet1_0", 64, True),
]


def _fx_traces(spec: str, model: torch.nn.Module) -> bool:
    if spec.startswith("timm:"):
        from timm.models._features_fx import get_graph_node_names
    else:
        from torchvision.models.feature_extraction import get_graph_node_names
    get_graph_node_names(model)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("spec, size, builds", SAMPLE, ids=[s[0] for s in SAMPLE])
def test_zoo_sample_dgn_exact_and_strict_dlgn_built_or_named(spec, size, builds):
    model = build(spec)
    assert _fx_traces(spec, model)
    model.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    calls = eager_gate_calls(model, x[:1])
    try:
        dgn = relu2dlgn.convert(model, mode="dgn", example_inputs=(x[:1],)).eval()
    except relu2dlgn.ConversionError as exc:
        assert calls == 0 and "has no gate site" in str(exc)
        dgn = None
    if dgn is not None:
        assert len(dgn.sites) == calls
        with torch.no_grad():
            out, ref = dgn(x), model(x)
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    try:
        dlgn = relu2dlgn.convert(model, mode="dlgn", example_inputs=(x[:1],))
    except relu2dlgn.ConversionError as exc:
        assert not builds, str(exc)
        assert str(exc).startswith(("strict DLGN conversion", f"{type(model).__name__} has no gate site"))
        assert " at node '" in str(exc) or "has no gate site" in str(exc)
        return
    assert builds
    dlgn = dlgn.eval().double()
    x1, x2 = x[:1].double(), torch.randn(1, 3, size, size, dtype=torch.float64)
    assert affinity_error(lambda t: tuple(dlgn.gating(t)), x1, x2) <= TOL

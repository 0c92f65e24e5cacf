"""Property tests on generated architectures (see _generated.py): for every generated model, DGN exactness,
DLGN affinity (gating in the input, value in the value input) and the planted site count."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=12)
@given(plans(max_steps=10), st.sampled_from(["dgn", "dlgn"]))
def test_generated_models_onnx_parity(tmp_path_factory, plan, mode):
    """A sample of generated models through export_onnx: verified against PyTorch in onnxruntime on another
    batch size (export_onnx raises ExportError otherwise), and its output compared here once more."""
    import numpy as np
    import onnxruntime as ort

    model = GenNet(plan).eval()
    dlgn = relu2dlgn.convert(model, mode=mode).eval()
    path = str(tmp_path_factory.mktemp("onnx") / "m.onnx")
    try:
        relu2dlgn.export_onnx(dlgn, path, example_inputs=(_input(plan),))
    except relu2dlgn.ExportError as exc:       # the one geometry ONNX cannot express: refused up front
        assert "ceil_mode=True" in str(exc) and "drops the last window" in str(exc)
        assert any(s.kind == "maxpool" and s.params["ceil_mode"] for s in dlgn.sites)
        return
    x = _input(plan, batch=4, seed=3)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = _outs(dlgn(x.clone()))
    for a, b in zip(got, ref):
        assert np.abs(a - b.numpy()).max() <= 1e-4 * max(1.0, float(b.abs().max()))

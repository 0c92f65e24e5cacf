"""ONNX export: onnxruntime parity with the PyTorch DLGN (hard gates), split files, gate outputs, errors, CLI.

References are independent of the exporter: the PyTorch model (``dlgn.eval()``, ``dlgn.gates``) and
onnxruntime sessions opened here on the written files.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from relu2dlgn import ExportError
from relu2dlgn.export import diagnostics
from relu2dlgn.export import files as export_files
from relu2dlgn.export import torch_export
from relu2dlgn.export import verify as export_verify
from helpers import run_cli
from relu2dlgn.cli.args import resolve
from relu2dlgn.cli.export import ExportCommand
from relu2dlgn.cli.main import build_parser
from relu2dlgn.export import ExportOptions, export_onnx, split_paths

from _models import TinyNet, build, input_size, randomize_bn, rel_err

GATE_TIE = 1e-5  # a gate may differ between backends only where q is this close to a tie (relative to max|q|)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------
# models and helpers
# --------------------------------------------------------------------------------------------------

class AllGates(nn.Module):
    """Every gate kind: LeakyReLU, PReLU, ReLU6, Hardtanh, functional ReLU, a padded max-pool and a
    ceil-mode max-pool; two outputs."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.leaky = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.c2, self.prelu = nn.Conv2d(8, 8, 3, padding=1), nn.PReLU(8)
        self.c3, self.b3, self.relu6 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6()
        self.c4, self.ht = nn.Conv2d(16, 16, 3, padding=1), nn.Hardtanh(-0.5, 0.5)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.leaky(self.b1(self.c1(x))))
        x = self.prelu(self.c2(x))
        x = self.relu6(self.b3(self.c3(x)) * 3)
        x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.ht(self.c4(x))
        feat = F.relu(x).mean((2, 3))
        return self.fc(feat), feat


def all_gates() -> nn.Module:
    torch.manual_seed(0)
    m = AllGates()
    with torch.no_grad():
        m.prelu.weight.copy_(torch.linspace(-0.5, 0.5, 8))
    return randomize_bn(m).eval()


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def run(path, *xs: torch.Tensor, extra: dict | None = None) -> list[np.ndarray]:
    s = session(path)
    feeds = dict(zip([i.name for i in s.get_inputs()], [x.numpy() for x in xs]))
    feeds.update(extra or {})
    return s.run(None, feeds)


def gate_flips(dlgn, xs, onnx_gates) -> int:
    """Number of gates where onnxruntime differs from ``dlgn.gates`` (eval); asserts each such gate is a tie."""
    dlgn.eval()
    with torch.no_grad():
        qs, ref = dlgn.pre_activations(*xs), dlgn.gates(*xs)
    assert len(onnx_gates) == len(ref) == len(dlgn.sites)
    flips = 0
    for site, q, r, o in zip(dlgn.sites, qs, ref, onnx_gates):
        o = torch.from_numpy(o)
        assert o.dtype == r.dtype and o.shape == r.shape, (site, o.dtype, o.shape, r.dtype, r.shape)
        diff = o != r
        if not diff.any():
            continue
        scale = q.abs().max()
        if site.kind == "maxpool":
            flat = q.flatten(2)
            gap = (flat.gather(2, r.flatten(2)) - flat.gather(2, o.flatten(2))).abs().view(r.shape)
        elif site.kind == "hardtanh":
            lo, hi = site.params["lo"], site.params["hi"]
            gap = torch.stack([(q - lo).abs(), (q - hi).abs()])
        else:
            gap = q.abs()
        assert gap[diff].max() <= GATE_TIE * scale, f"gate {site.index} ({site.kind}) flipped away from a tie"
        flips += int(diff.sum())
    return flips


def check_parity(dlgn, xs, outputs, gates) -> None:
    """onnxruntime's outputs equal PyTorch's value network at onnxruntime's gates, and ``dlgn(x)`` when no gate
    flipped; every flipped gate is a tie."""
    flips = gate_flips(dlgn, xs, gates)
    with torch.no_grad():
        at_onnx_gates = dlgn.value(*dlgn.value_inputs(*xs), *[torch.from_numpy(g) for g in gates])
        ref = dlgn(*xs)
    at_onnx_gates = at_onnx_gates if isinstance(at_onnx_gates, tuple) else (at_onnx_gates,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(outputs) == len(ref)
    for o, c, r in zip(outputs, at_onnx_gates, ref):
        assert o.shape == tuple(r.shape)
        assert rel_err(torch.from_numpy(o), c) < 1e-5
        if flips == 0:
            assert rel_err(torch.from_numpy(o), r) < 1e-5


# --------------------------------------------------------------------------------------------------
# every gate kind, both modes, both value inputs, both pool policies
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,value_input,pool", [
    ("dlgn", "input", "gate"), ("dlgn", "ones", "gate"), ("dlgn", "input", "avg"),
    ("dgn", "input", "gate"), ("dgn", "ones", "gate"),
])
def test_every_gate_kind(tmp_path, mode, value_input, pool):
    x = torch.randn(2, 3, 17, 17)
    dlgn = relu2dlgn.convert(all_gates(), mode=mode, value_input=value_input, pool=pool, example_inputs=(x,))
    kinds = {s.kind for s in dlgn.sites}
    assert {"relu", "leaky_relu", "prelu", "hardtanh"} <= kinds
    assert ("maxpool" in kinds) == (pool == "gate" or mode == "dgn")
    path = tmp_path / "m.onnx"
    report = export_onnx(dlgn, path, (x,), gates_output=True)

    n = len(dlgn.sites)
    model = onnx.load(path)
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"] + [f"gate_{i}" for i in range(n)]
    assert report.files[0].outputs == [o.name for o in model.graph.output]
    assert report.files[0].inputs == ["x"] and report.verification.ok
    ops = report.files[0].ops
    assert not {"Sigmoid", "Softmax", "Exp"} & set(ops)  # hard gates only
    if mode == "dlgn":  # the gating network is linear: no activation op left anywhere
        assert not {"Relu", "LeakyRelu", "PRelu", "Clip"} & set(ops)
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for node in model.graph.node:  # HardSigmoid only as a 0/1 gate mask that multiplies a value (passes.py)
        if node.op_type == "HardSigmoid":
            assert consumers[node.output[0]] == ["Mul"]
    assert not any(n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1] for n in model.graph.node)
    assert bool(ops.get("GatherElements")) == ("maxpool" in kinds)  # the max-pool gate's read, default form

    for batch in (3, 1):  # dynamic batch: neither is the traced batch
        xb = torch.randn(batch, 3, 17, 17)
        res = run(path, xb)
        check_parity(dlgn, (xb,), res[:2], res[2:])
        for site, g in zip(dlgn.sites, res[2:]):
            if site.kind == "maxpool":
                assert g.dtype == np.int64
            else:
                assert g.dtype == np.bool_
                if site.kind == "hardtanh":
                    assert g.shape[:2] == (2, batch)


def test_gates_output_equals_dlgn_gates(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,))
    export_onnx(dlgn, tmp_path / "m.onnx", x, gates_output=True)
    xb = torch.randn(5, 3, 16, 16)
    res = run(tmp_path / "m.onnx", xb)
    with torch.no_grad():
        ref = dlgn.eval().gates(xb)
    assert len(res) == 1 + len(ref)
    for g, r in zip(res[1:], ref):
        np.testing.assert_array_equal(g, r.numpy())


# --------------------------------------------------------------------------------------------------
# model zoo
# --------------------------------------------------------------------------------------------------

FAST = ["timm:resnet18", "tv:resnet18", "tv:mobilenet_v2"]
SLOW = ["timm:resnet50", "timm:vgg16_bn", "timm:densenet121", "tv:inception_v3"]
ZOO = [pytest.param(s, m, id=f"{s}-{m}") for s in FAST for m in ("dlgn", "dgn")] + \
      [pytest.param(s, m, id=f"{s}-{m}", marks=pytest.mark.slow) for s in SLOW for m in ("dlgn", "dgn")]


@pytest.mark.parametrize("spec,mode", ZOO)
def test_zoo_parity(tmp_path, spec, mode):
    size = input_size(spec)
    x = torch.randn(2, 3, size, size)
    dlgn = relu2dlgn.convert(build(spec), mode=mode, example_inputs=(x,))
    path = tmp_path / "m.onnx"
    report = export_onnx(dlgn, path, (x,), gates_output=True)
    assert report.verification.ok and report.dynamic_batch
    xb = torch.randn(3, 3, size, size)
    res = run(path, xb)
    check_parity(dlgn, (xb,), res[:1], res[1:])


# --------------------------------------------------------------------------------------------------
# split files
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tv:resnet18-dlgn", "allgates-dgn-ones"])
def test_split_composes_to_fused(tmp_path, which):
    if which.startswith("tv"):
        x, model, kw = torch.randn(2, 3, 64, 64), build("tv:resnet18"), {"mode": "dlgn"}
    else:
        x, model, kw = torch.randn(2, 3, 17, 17), all_gates(), {"mode": "dgn", "value_input": "ones"}
    dlgn = relu2dlgn.convert(model, example_inputs=(x,), **kw)
    fused = export_onnx(dlgn, tmp_path / "m.onnx", (x,))
    split = export_onnx(dlgn, tmp_path / "s.onnx", (x,), split=True)
    gating_path, value_path = split_paths(tmp_path / "s.onnx")
    assert gating_path.endswith("s.gating.onnx") and value_path.endswith("s.value.onnx")
    assert split.paths == [gating_path, value_path]
    assert not (tmp_path / "s.onnx").exists() and os.path.exists(gating_path) and os.path.exists(value_path)
    assert split.verification.ok and fused.verification.ok
    assert split.files[1].inputs == ["x"] + [f"gate_{i}" for i in range(len(dlgn.sites))]

    xb = torch.randn(3, *x.shape[1:])
    gates = run(gating_path, xb)
    composed = run(value_path, xb, extra={f"gate_{i}": g for i, g in enumerate(gates)})
    out_fused = run(fused.path, xb)
    assert len(composed) == len(out_fused)
    for a, b in zip(composed, out_fused):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    n_out = len(out_fused)
    check_parity(dlgn, (xb,), composed[:n_out], gates)


# --------------------------------------------------------------------------------------------------
# batch axis, modes, shape specialisation
# --------------------------------------------------------------------------------------------------

def test_batch_one_example_and_static_batch(tmp_path):
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(torch.randn(1, 3, 16, 16),))
    report = export_onnx(dlgn, tmp_path / "dyn.onnx", torch.randn(1, 3, 16, 16))
    assert report.dynamic_batch and report.verification.batch != 1
    for batch in (1, 4):
        xb = torch.randn(batch, 3, 16, 16)
        out = run(tmp_path / "dyn.onnx", xb)[0]
        with torch.no_grad():
            assert rel_err(torch.from_numpy(out), dlgn.eval()(xb)) < 1e-5

    static = export_onnx(dlgn, tmp_path / "static.onnx", torch.randn(2, 3, 16, 16), dynamic_batch=False)
    assert static.verification.batch == 2
    dims = onnx.load(tmp_path / "static.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 16, 16]
    with pytest.raises(InvalidArgument, match=r"invalid dimensions for input: x.*\n index: 0 Got: 3 Expected: 2"):
        run(tmp_path / "static.onnx", torch.randn(3, 3, 16, 16))
    with pytest.raises(ExportError, match="exactly 2"):
        export_onnx(dlgn, tmp_path / "bad.onnx", torch.randn(2, 3, 16, 16), dynamic_batch=False, verify_batch=3)


class BatchFolding(nn.Module):
    """Reshapes the batch of 2 into the feature axis: only valid at that batch size."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(2 * 4 * 14 * 14, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).reshape(1, -1))


def test_a_model_that_bakes_in_the_batch_size_needs_a_static_batch(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(BatchFolding().eval(), example_inputs=(x,))
    with pytest.raises(ExportError, match="specialises on the batch size.*dynamic_batch=False"):
        export_onnx(dlgn, tmp_path / "m.onnx", x)
    assert not os.listdir(tmp_path)
    assert export_onnx(dlgn, tmp_path / "m.onnx", x, dynamic_batch=False).verification.ok


def test_exports_hard_gates_from_train_mode_and_restores_it(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,)).train()
    export_onnx(dlgn, tmp_path / "m.onnx", x, gates_output=True)
    assert dlgn.training and all(m.training for m in dlgn.modules())
    res = run(tmp_path / "m.onnx", x)
    with torch.no_grad():
        hard = dlgn.eval().gates(x)
    for g, r in zip(res[1:], hard):
        np.testing.assert_array_equal(g, r.numpy())


class Branchy(nn.Module):
    """Branches on the input's spatial size: converted graphs carry a shape-specialisation guard."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if y.shape[-1] < 12:
            y = F.pad(y, (1, 1, 1, 1))
        return self.fc(y.mean((2, 3)))


def test_shape_guards_are_specialised_at_the_example_shape(tmp_path):
    x = torch.randn(2, 3, 10, 10)
    dlgn = relu2dlgn.convert(Branchy().eval(), example_inputs=(x,))
    assert dlgn.report.specialised
    report = export_onnx(dlgn, tmp_path / "m.onnx", x)
    assert report.verification.ok
    xb = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        assert rel_err(torch.from_numpy(run(tmp_path / "m.onnx", xb)[0]), dlgn.eval()(xb)) < 1e-5
    with pytest.raises(InvalidArgument, match=r"invalid dimensions for input: x.*\n index: 2 Got: 20 Expected: 10"):
        run(tmp_path / "m.onnx", torch.randn(2, 3, 20, 20))  # the spatial size is fixed, as the guard requires


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def test_report_contents(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,))
    report = export_onnx(dlgn, tmp_path / "m.onnx", x)
    text = str(report)
    for needle in ("max |err|", "p99 |err|", "opset", "ops:", "inputs:  x", "outputs: output", "KiB",
                   "GatherElements", "fresh batch of 3"):
        assert needle in text, needle
    f = report.files[0]
    assert f.size == os.path.getsize(tmp_path / "m.onnx") and f.opset >= 18
    assert f.ops == {k: v for k, v in _histogram(tmp_path / "m.onnx").items()}
    assert report.max_abs_error is not None and report.p99_abs_error <= report.max_abs_error
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert meta["relu2dlgn.mode"] == "dlgn" and meta["relu2dlgn.part"] == "fused"
    assert not [p for p in os.listdir(tmp_path) if p != "m.onnx"]  # no temporary left behind

    assert export_onnx(dlgn, tmp_path / "o.onnx", x, opset=18).opset == 18


def _histogram(path) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in onnx.load(path).graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def test_models_over_2gib_keep_weights_in_a_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_files, "TWO_GIB", 1024)  # pretend every model is over the protobuf limit
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,))
    report = export_onnx(dlgn, tmp_path / "m.onnx", x)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert report.files[0].size == os.path.getsize(tmp_path / "m.onnx") + os.path.getsize(tmp_path / "m.onnx.data")
    xb = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(torch.from_numpy(run(tmp_path / "m.onnx", xb)[0]), dlgn.eval()(xb)) < 1e-5

    _perturb_outputs(monkeypatch, 1.01)  # the gate check then loads the with-gates copy from a scratch file
    with pytest.raises(ExportError, match="does not reproduce"):
        export_onnx(dlgn, tmp_path / "n.onnx", x)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------

def test_unwritable_path_writes_nothing_and_fails_before_exporting(tmp_path, monkeypatch):
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(torch.randn(2, 3, 16, 16),))

    def no_export(*a, **k):
        raise AssertionError("exported although the path cannot be written")

    monkeypatch.setattr(torch_export, "export_part", no_export)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad, why in ((tmp_path / "missing" / "m.onnx", "directory .* does not exist"),
                     (blocker / "m.onnx", "directory .* does not exist"), (tmp_path, "it is a directory")):
        with pytest.raises(ExportError, match=f"cannot write .*: {why}"):
            export_onnx(dlgn, bad, torch.randn(2, 3, 16, 16))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # an unwritable directory (the tests may run as root)
    with pytest.raises(ExportError, match=r"cannot write '.*m\.onnx': Permission denied \(nothing was written\)"):
        export_onnx(dlgn, tmp_path / "m.onnx", torch.randn(2, 3, 16, 16))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def _perturb_outputs(monkeypatch, factor: float):
    real = export_verify.run_onnx

    def perturbed(session, feeds):
        res = real(session, feeds)
        names = [o.name for o in session.get_outputs()]
        return [r * factor if n.startswith("output") else r for r, n in zip(res, names)]

    monkeypatch.setattr(export_verify, "run_onnx", perturbed)


@pytest.mark.parametrize("kw", [{}, {"gates_output": True}, {"split": True}])
def test_parity_failure_raises_and_keeps_the_old_file(tmp_path, monkeypatch, kw):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,))
    target = tmp_path / "m.onnx"
    targets = split_paths(target) if kw.get("split") else [target]
    for t in targets:
        with open(t, "w") as f:
            f.write("previous model")
    _perturb_outputs(monkeypatch, 1.01)
    with pytest.raises(ExportError, match=r"(?s)does not reproduce.*max \|err\|.*problem: output 0"):
        export_onnx(dlgn, target, x, **kw)
    for t in targets:
        assert open(t).read() == "previous model"
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(t) for t in targets)


def _flip_one_gate(monkeypatch, dlgn, pick):
    """Make onnxruntime's gate_0 differ from PyTorch at the element ``pick(|q|)`` of site 0."""
    real = export_verify.run_onnx

    def flipped(session, feeds):
        res = real(session, feeds)
        names = [o.name for o in session.get_outputs()]
        if "gate_0" in names:
            with torch.no_grad():
                q = dlgn.gating(torch.from_numpy(feeds["x"]))[0]
            g = res[names.index("gate_0")]
            i = int(pick(q.abs().flatten()))
            g.flat[i] = not g.flat[i]
        return res

    monkeypatch.setattr(export_verify, "run_onnx", flipped)


def test_gate_flip_at_a_tie_is_accepted_and_reported(tmp_path, monkeypatch):
    x = torch.randn(2, 3, 64, 64)  # ~10^5 pre-activations at site 0: the one nearest 0 is within 1e-5 of max|q|
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,)).eval()
    _flip_one_gate(monkeypatch, dlgn, torch.argmin)  # the pre-activation closest to 0
    report = export_onnx(dlgn, tmp_path / "m.onnx", x, split=True)
    v = report.verification
    assert v.ok and v.gates_flipped == 1 and v.sites[0].flipped == 1 and v.worst_tie <= v.gate_tol
    assert "1 of" in str(report) and "at ties" in str(report)


def test_gate_flip_away_from_a_tie_fails(tmp_path, monkeypatch):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,)).eval()
    _flip_one_gate(monkeypatch, dlgn, torch.argmax)
    with pytest.raises(ExportError, match=r"gate 0 \(relu at 'relu'\).*away from a tie"):
        export_onnx(dlgn, tmp_path / "m.onnx", x, gates_output=True)
    assert not os.listdir(tmp_path)


@torch.library.custom_op("relu2dlgn_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


@torch.fx.wrap
def numpy_round_trip(x):
    return torch.from_numpy(x.detach().numpy() * 2)


class Opaque(nn.Module):
    """A gate followed by an op that torch.onnx cannot lower (``"custom"``) or torch.export cannot trace
    (``"numpy"``); both are kept by a strict=False conversion."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv, self.kind = nn.Conv2d(3, 4, 3), kind

    def forward(self, x):
        y = F.relu(self.conv(x))
        y = wobble(y) if self.kind == "custom" else numpy_round_trip(y)
        return y.mean((2, 3))


def test_op_without_onnx_lowering_is_named(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(Opaque("custom").eval(), example_inputs=(x,), strict=False)
    with pytest.raises(ExportError, match=r"no ONNX lowering for op relu2dlgn_test\.wobble\.default at node "
                                          r"'wobble_default' of the value graph") as info:
        export_onnx(dlgn, tmp_path / "m.onnx", x)
    assert "strict=False" in str(info.value) and "custom_translations" in str(info.value)
    assert "\x1b" not in str(info.value)  # torch's colour codes are removed
    assert not os.listdir(tmp_path)


def test_untraceable_python_is_named(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(Opaque("numpy").eval(), example_inputs=(x,), strict=False)
    with pytest.raises(ExportError, match=r"torch\.export cannot capture the DLGN: it fails at node "
                                          r"'numpy_round_trip' of the value graph"):
        export_onnx(dlgn, tmp_path / "m.onnx", x)
    assert not os.listdir(tmp_path)


def test_stack_trace_format_is_what_diagnostics_parse():
    """diagnostics reads where an ExportedProgram node comes from in the DLGN out of its ``meta["stack_trace"]``,
    which torch keeps only as formatted text; this pins that format (and the fx-node lookup) on a real export."""
    from relu2dlgn.export.module import ExportModule

    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(Opaque("custom").eval(), example_inputs=(x,), strict=False).eval()
    ep = torch.export.export(ExportModule(dlgn, "fused"), (x,), strict=False)
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.relu2dlgn_test.wobble.default)
    files = diagnostics.graph_files(dlgn)
    stack = node.meta["stack_trace"]
    frames = [(m.group("file"), int(m.group("line"))) for m in diagnostics.STACK_FRAME.finditer(stack)]
    assert any(f in files and line > 0 for f, line in frames), stack
    assert diagnostics.locate_in_stack_trace(node.meta["stack_trace"], files) == \
        "node 'wobble_default' of the value graph (call_function relu2dlgn_test.wobble.default, module '<root>')"


def test_translation_failure_is_read_structurally():
    """The op without an ONNX lowering and its DLGN node come from torch.onnx's exception types and traceback
    frames, not from its text: the same failure with every message blanked is diagnosed the same way."""
    from relu2dlgn.export.module import ExportModule

    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(Opaque("custom").eval(), example_inputs=(x,), strict=False).eval()
    files = diagnostics.graph_files(dlgn)
    with pytest.raises(ExportError, match="no ONNX lowering") as info:
        torch_export.export_part(ExportModule(dlgn, "fused"), (x,), None, ["x"], ["output"], what="DLGN",
                                 opset=None, custom_translations=None, files=files, timings={})
    torch_error = e = info.value.__cause__
    while e is not None:
        e.args = ()
        assert str(e) == "", type(e)
        e = e.__cause__ or e.__context__
    assert str(diagnostics.translation_failure(torch_error, files, what="DLGN")).startswith(
        "no ONNX lowering for op relu2dlgn_test.wobble.default at node 'wobble_default' of the value graph "
        "(call_function relu2dlgn_test.wobble.default, module '<root>') in the DLGN")


def test_custom_translation_makes_it_exportable(tmp_path):
    from onnxscript import opset18 as op

    def wobble_onnx(x):
        return op.Add(x, x)

    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(Opaque("custom").eval(), example_inputs=(x,), strict=False)
    report = export_onnx(dlgn, tmp_path / "m.onnx", x,
                         custom_translations={torch.ops.relu2dlgn_test.wobble.default: wobble_onnx})
    assert report.verification.ok


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

_cli = run_cli


def test_cli_export(tmp_path, capsys):
    saved = tmp_path / "saved"
    relu2dlgn.convert(TinyNet().eval(), example_inputs=(torch.randn(1, 3, 16, 16),)).save(str(saved))
    assert _cli(["export", str(saved), "--out", str(tmp_path / "m.onnx"), "--gates-output", "--opset", "18"]) == 0
    out = capsys.readouterr().out
    assert "m.onnx" in out and "verified with onnxruntime" in out and "gate_0" in out
    assert onnx.load(tmp_path / "m.onnx").opset_import[0].version == 18

    assert _cli(["export", str(saved), "--out", str(tmp_path / "s.onnx"), "--split", "--input-size", "3,20,20"]) == 0
    g, v = split_paths(tmp_path / "s.onnx")
    assert os.path.exists(g) and os.path.exists(v)
    dims = onnx.load(g).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1:] == [3, 20, 20]


def test_export_options_match_export_onnx_and_the_cli():
    """ExportOptions (what a generated command line sets) has export_onnx's defaults and today's flags' defaults."""
    import dataclasses
    import inspect

    from relu2dlgn.errors import OptionError
    from relu2dlgn.options import validate

    opts = ExportOptions()
    assert [f.name for f in dataclasses.fields(opts)] == ["split", "opset", "gates_output", "portable", "dtype",
                                                         "dynamic_batch", "verify", "batch", "input_size"]
    params = inspect.signature(export_onnx).parameters
    for name in ("split", "opset", "gates_output", "portable", "dtype", "dynamic_batch", "verify"):
        assert getattr(opts, name) == params[name].default, name
    args = build_parser().parse_args(["export", "saved", "--out", "m.onnx"])
    assert resolve(ExportCommand, args).export == opts              # the flags' defaults are the options'
    args = build_parser().parse_args(["export", "saved", "--out", "m.onnx", "--no-dynamic-batch", "--no-verify",
                                      "--split", "--opset", "18", "--input-size", "3,8,8", "--batch", "3"])
    assert resolve(ExportCommand, args).export == ExportOptions(split=True, opset=18, dynamic_batch=False,
                                                                verify=False, batch=3, input_size=(3, 8, 8))
    validate(opts)
    validate(ExportOptions(opset=18, input_size=(3, 32, 32), batch=1, dynamic_batch=False))
    with pytest.raises(OptionError, match=r"input_size=\(3, 0, 4\).*positive sizes"):
        validate(ExportOptions(input_size=(3, 0, 4)))
    with pytest.raises(OptionError, match=r"batch=0.*>= 1"):
        validate(ExportOptions(batch=0))


def test_cli_needs_an_input_size_when_none_was_saved(tmp_path, capsys):
    saved = tmp_path / "saved"
    dlgn = relu2dlgn.convert(TinyNet().eval())
    assert dlgn.input_specs[0].example_shape is None
    dlgn.save(str(saved))
    assert _cli(["export", str(saved), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "ExportError: the model records no example shape for input(s) x; give input_size (--input-size C,H,W)" \
        in capsys.readouterr().err
    assert _cli(["export", str(saved), "--out", str(tmp_path / "m.onnx"), "--input-size", "3,16,16"]) == 0

"""Named regression tests: bugs that the generated-architecture properties (test_generated.py) found, and the
defects of issue 9 (a demanding user's conversions); each test failed before its fix."""
from __future__ import annotations

import operator
import re

import pytest
import torch
import torch.nn.functional as F
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
    torch.manual_seed(0)  # weights from the global generator: with some, the ReLU is off everywhere and 3x == 4x
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


# --------------------------------------------------------------------------------------------------
# issue 9
# --------------------------------------------------------------------------------------------------

class _WithDefaults(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x, mask=None, scale: float = 2.0):
        y = F.relu(self.conv(x))
        if mask is not None:
            y = y * mask
        return y * scale


def test_forward_with_default_arguments_converts():
    """Issue 9, defect 1: ``forward(self, x, mask=None)`` gave ``SyntaxError: non-default argument follows
    default argument`` from the value graph's generated code (gate placeholders after the inputs), in both
    modes. Arguments with a default that ``example_inputs`` does not cover are now fixed at their default (the
    converted model takes ``x`` only, like ``model(x)``); arguments it covers are inputs."""
    model = _WithDefaults().eval()
    torch.manual_seed(0)
    x, mask = torch.randn(2, 2, 4, 4), torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        for mode in ("dgn", "dlgn"):      # one site whose pre-activation is the source's: both equal the source
            d = relu2dlgn.convert(model, mode=mode).eval()
            assert [s.name for s in d.input_specs] == ["x"]
            assert torch.equal(d(x), model(x))
            with pytest.raises(relu2dlgn.InputError, match="expects 1 input"):
                d(x, mask)
            # the mask is an input too, so `y * mask` is a product of two input-dependent tensors
            d2 = relu2dlgn.convert(model, mode=mode, example_inputs=(x, mask), strict=False).eval()
            assert [s.name for s in d2.input_specs] == ["x", "mask"]
            assert torch.equal(d2(x, mask), model(x, mask))
        assert not torch.equal(model(x, mask), model(x))
        with pytest.raises(relu2dlgn.ConversionError, match="operator.mul of two input-dependent tensors"):
            relu2dlgn.convert(model, example_inputs=(x, mask))


class _MutatesActivationResult(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 1)
        self.c2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.c1(x)
        r = F.relu(a)
        r.mul_(2)                       # writes into the ReLU's result, a new tensor: `a` is unchanged
        return F.relu(self.c2(r) + a)


def test_dlgn_removed_site_does_not_alias_its_input():
    """Issue 9, defect 2: the DLGN gating graph replaced a removed out-of-place ReLU by its input itself, so
    ``r.mul_(2)`` then doubled ``a``, which ``c2(r) + a`` reads (error 1.0 against the source with its
    activations removed). Reference: that source written out, ``q0 = c1(x)``, ``q1 = c2(2 c1(x)) + c1(x)``."""
    model = _MutatesActivationResult().eval()
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.c1(x)
        expected = (a, model.c2(2 * a) + a)
        q = relu2dlgn.convert(model, mode="dlgn").eval().pre_activations(x)
    assert len(q) == 2
    for got, ref in zip(q, expected):
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where, register", [
    ("'1' (ReLU)", lambda m: m[1].register_forward_hook(lambda mod, i, o: o.clamp(max=0.5))),
    ("'0' (Conv2d)", lambda m: m[0].register_forward_pre_hook(lambda mod, i: None)),
    ("'<root>' (Sequential)", lambda m: m.register_forward_hook(lambda mod, i, o: o * 2)),
], ids=["clip-hook-on-relu", "pre-hook-on-conv", "hook-on-root"])
def test_module_hooks_are_refused_naming_the_module(where, register):
    """Issue 9, defect 3: hooks were dropped on activation modules (a clipping hook on nn.ReLU: the DGN differed
    from the source by 0.13) and on the root, and fired twice per forward on modules copied into both graphs.
    They are refused, naming the module and the remedy; without the hook the model converts."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 3, 1)).eval()
    handle = register(model)
    for mode in ("dgn", "dlgn"):
        with pytest.raises(relu2dlgn.ConversionError, match=re.escape(f"module {where} has a forward") + ".*remove it"):
            relu2dlgn.convert(model, mode=mode)
    handle.remove()
    relu2dlgn.convert(model, mode="dgn")


class _FrozenStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        with torch.no_grad():
            y = F.relu(self.stem(x))
        return F.relu(self.head(y)).mean()


@pytest.mark.parametrize("mode", ["dgn", "dlgn"])
def test_no_grad_region_in_forward_is_kept(mode):
    """Issue 9, defect 4: ``with torch.no_grad():`` inside forward was lost, so gradients flowed into the stem
    the source froze. Reference: the source's own gradients (none for the stem, some for the head)."""
    model = _FrozenStem().train()
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    model(x).backward()
    assert model.stem.weight.grad is None and model.head.weight.grad is not None
    d = relu2dlgn.convert(model, mode=mode).train()
    d(x).backward()
    for net in (d.gating, d.value):
        if hasattr(net, "stem"):
            assert net.stem.weight.grad is None
    assert d.value.head.weight.grad is not None
    assert torch.is_grad_enabled()                      # the region's end restored the caller's grad mode
    with torch.no_grad():
        d(x)
        assert not torch.is_grad_enabled()


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 1)
        self.c2 = nn.Conv2d(3, 3, 1)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return self.c2(F.relu(self.c1(x))).relu()


def test_tied_parameters_stay_tied_after_save_and_load(tmp_path):
    """Issue 9, defect 6: tied parameters came back untied after save/load (5 parameters before, 6 after)."""
    d = relu2dlgn.convert(_Tied().eval(), mode="dgn")
    before = len(list(d.parameters()))
    assert d.gating.c1.weight is d.gating.c2.weight
    d.save(tmp_path / "m")
    loaded = relu2dlgn.load(tmp_path / "m")
    assert len(list(loaded.parameters())) == before
    assert loaded.gating.c1.weight is loaded.gating.c2.weight
    assert loaded.value.c1.weight is loaded.value.c2.weight
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), d.eval()(x))


def test_torch_compiled_model_is_unwrapped():
    """Issue 9, defect 8: converting a ``torch.compile``d model suggested ``leaf_modules=('',)``, which fails the
    same way. The wrapper is unwrapped (its ``_orig_mod`` is converted)."""
    from _models import TinyNet
    model = TinyNet().eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 8, 8)
    d = relu2dlgn.convert(compiled, mode="dgn").eval()
    assert d.report.source == "TinyNet"
    with torch.no_grad():
        assert torch.equal(d(x), model(x))


class _OutWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        torch.add(y, 1.0, out=y)
        return F.relu(y).sum((2, 3))


def test_out_keyword_write_is_kept():
    """Issue 9, (a): ``torch.add(y, 1.0, out=y)`` was treated as a fresh op and pruned (DGN error 0.94)."""
    model = _OutWrite().eval()
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        d = relu2dlgn.convert(model, mode="dgn").eval()
        assert torch.equal(d(x), ref)


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

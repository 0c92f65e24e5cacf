"""convert(): DGN exactness, DLGN faithfulness (affinity), site counts, training, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import relu2dlgn
from _models import AllForms, MutatesAfterSite, Pool3d, TinyNet, build, input_size, randomize_bn, rel_err

FAST_ZOO = ["timm:resnet18", "timm:vgg11", "timm:regnetx_002", "tv:resnet18", "tv:vgg11", "tv:mobilenet_v2"]
SLOW_ZOO = ["timm:resnet50", "timm:vgg16_bn", "timm:densenet121", "tv:inception_v3"]
ZOO = FAST_ZOO + [pytest.param(s, marks=pytest.mark.slow) for s in SLOW_ZOO]

_GATE_OPS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "hardtanh", "hardtanh_", "relu6",
             "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d"}


class CountGateCalls(TorchFunctionMode):
    """Independent reference for site counts: count the activation / max-pool calls an eager forward makes
    (torch function modes see the outermost call only, so nn.ReLU -> F.relu counts once)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _GATE_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def eager_gate_calls(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), CountGateCalls() as counter:
        model(x)
    return counter.count


def example(spec: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    s = input_size(spec)
    return torch.randn(batch, 3, s, s)


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


# ---------------------------------------------------------------------------------------------------
# DGN exactness: convert(m.eval(), mode="dgn", value_input="input").eval() == m.eval()
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ZOO)
def test_dgn_exact_zoo(spec):
    model = build(spec)
    x = example(spec)
    dgn = relu2dlgn.convert(model, mode="dgn", value_input="input", example_inputs=x[:1]).eval()
    with torch.no_grad():
        assert rel_err(dgn(x), model(x)) <= 1e-5
    assert len(dgn.sites) == eager_gate_calls(model, x)


@pytest.mark.parametrize("cls", [AllForms, Pool3d, MutatesAfterSite, TinyNet])
def test_dgn_exact_handwritten(cls):
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    x = torch.randn(2, 2, 9, 10, 11) if cls is Pool3d else torch.randn(2, 3, 24, 24)
    dgn = relu2dlgn.convert(model, mode="dgn", value_input="input").eval()
    with torch.no_grad():
        for a, b in zip(_outputs(dgn(x)), _outputs(model(x))):
            assert rel_err(a, b) <= 1e-5
    if hasattr(cls, "SITES"):
        assert len(dgn.sites) == cls.SITES == eager_gate_calls(model, x)


def test_site_kinds_and_paths_allforms():
    dlgn = relu2dlgn.convert(AllForms(), mode="dlgn")
    kinds = [s.kind for s in dlgn.sites]
    assert kinds.count("relu") == 9 and kinds.count("leaky_relu") == 3 and kinds.count("prelu") == 2
    assert kinds.count("hardtanh") == 5 and kinds.count("maxpool") == 4
    ops = [s.op for s in dlgn.sites]
    assert ops[:7] == ["nn.ReLU", "F.relu", "torch.relu", "Tensor.relu_", "Tensor.relu", "torch.relu_", "F.relu"]
    reused = [s for s in dlgn.sites if s.module_path == "relu"]
    assert len(reused) == 2 and reused[0].node != reused[1].node      # one module, two gates
    assert [s.inplace for s in dlgn.sites][:8] == [False, False, False, True, False, True, True, True]
    assert [s.index for s in dlgn.sites] == list(range(AllForms.SITES))


# ---------------------------------------------------------------------------------------------------
# DLGN faithfulness: gating affine in x, value affine in the value input for fixed gates
# ---------------------------------------------------------------------------------------------------

def _assert_affine(f, x1, x2, a=0.3, tol=1e-8):
    """f(a x1 + (1-a) x2) == a f(x1) + (1-a) f(x2) for every output (float64)."""
    mixed = f(a * x1 + (1 - a) * x2)
    for m, y1, y2 in zip(_outputs(mixed), _outputs(f(x1)), _outputs(f(x2))):
        assert rel_err(m, a * y1 + (1 - a) * y2) <= tol


def _check_dlgn_affine(model, x, **kwargs):
    dlgn = relu2dlgn.convert(model, mode="dlgn", example_inputs=x[:1].float(), **kwargs).eval().double()
    x = x.double()
    torch.manual_seed(2)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        _assert_affine(lambda t: dlgn.pre_activations(t), x, x2)
        gates = dlgn.gates(x)
        _assert_affine(lambda v: dlgn.value(v, *gates), x, x2)
        # and the gates really are functions of the gating net: changing them changes the value output
        assert not torch.equal(_outputs(dlgn.value(x, *gates))[0], _outputs(dlgn.value(x, *dlgn.gates(x2)))[0])
    return dlgn


@pytest.mark.parametrize("spec", ZOO)
def test_dlgn_affine_zoo(spec):
    model = build(spec)
    dlgn = _check_dlgn_affine(model, example(spec))
    assert len(dlgn.sites) == eager_gate_calls(model, example(spec))


@pytest.mark.parametrize("pool", ["gate", "avg"])
def test_dlgn_affine_handwritten(pool):
    torch.manual_seed(0)
    model = randomize_bn(AllForms()).eval()
    dlgn = _check_dlgn_affine(model, torch.randn(2, 3, 24, 24), pool=pool)
    n_pool = sum(s.kind == "maxpool" for s in dlgn.sites)
    assert n_pool == (4 if pool == "gate" else 0)
    assert len(dlgn.sites) == AllForms.SITES - (0 if pool == "gate" else 4)


def test_dlgn_gating_has_no_activation_and_no_dead_tail():
    dlgn = relu2dlgn.convert(randomize_bn(TinyNet()).eval(), mode="dlgn")
    targets = {n.target for n in dlgn.gating.graph.nodes if n.op == "call_module"}
    assert targets == {"conv1", "bn1", "conv2", "bn2"}          # no relu/maxpool module, no fc (dead)
    assert not any(k.startswith("fc") for k in dlgn.gating.state_dict())
    assert set(dlgn.value.state_dict()) == set(TinyNet().state_dict())


def test_capture_before_inplace_mutation():
    """q of a site must be the value at the site even if an in-place op changes that tensor later."""
    model = MutatesAfterSite().eval()
    x = torch.randn(2, 3, 8, 8)
    dlgn = relu2dlgn.convert(model, mode="dlgn").eval()
    with torch.no_grad():
        q0, q1 = dlgn.pre_activations(x)
        ref = model.conv(x)
        assert torch.allclose(q0, ref) and torch.allclose(q1, ref + 1)


def test_inplace_alias_semantics_kept_in_value_graph():
    """identity = z; relu_(z): the alias sees the activation in the source, so it must in the DGN too."""
    model = randomize_bn(AllForms()).eval()
    dgn = relu2dlgn.convert(model, mode="dgn").eval()
    code = dgn.value.code
    assert "gate_relu_(" in code and "gate_hardtanh_(" in code and "gate_leaky_relu_(" in code


def test_dlgn_with_ones_value_input():
    model = randomize_bn(TinyNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(model, mode="dlgn", value_input="ones").eval()
    with torch.no_grad():
        out = dlgn(x)
        assert torch.equal(out, dlgn.value(torch.ones_like(x), *dlgn.gates(x)))
        assert not torch.allclose(out, dlgn(x.flip(0)))        # information flows through the gates


def test_dgn_soft_gates_approach_hard_as_beta_grows():
    model = randomize_bn(TinyNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    dgn = relu2dlgn.convert(model, mode="dgn")
    with torch.no_grad():
        ref = model(x)
        dgn.train()
        for m in dgn.modules():       # soft gates, but eval batch norm
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        errs = []
        for beta in (4.0, 64.0, 4096.0):
            dgn.beta = beta
            errs.append(rel_err(dgn(x), ref))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dlgn", "dgn"])
def test_gradients_reach_gating_and_value(mode):
    torch.manual_seed(0)
    dlgn = relu2dlgn.convert(AllForms(), mode=mode).train()
    x = torch.randn(2, 3, 24, 24)
    logits, total = dlgn(x)
    (logits.square().mean() + total * 1e-3).backward()
    for part in (dlgn.gating, dlgn.value):
        grads = [p.grad for p in part.parameters()]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert dlgn.value.get_parameter("prelu.weight").grad.abs().sum() > 0     # PReLU slope is a value param


def test_beta_changes_soft_gates_only():
    dlgn = relu2dlgn.convert(TinyNet(), mode="dlgn").train()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        g1 = dlgn.gates(x)
        dlgn.beta = 2.0
        g2 = dlgn.gates(x)
        assert not torch.allclose(g1[0], g2[0])
        dlgn.eval()
        h1 = dlgn.gates(x)
        dlgn.beta = 50.0
        h2 = dlgn.gates(x)
        assert all(torch.equal(a, b) for a, b in zip(h1, h2))
        assert set(h1[0].unique().tolist()) <= {0.0, 1.0}
        assert h1[1].dtype == torch.int64                   # max-pool: arg-max indices
    with pytest.raises(ValueError, match="beta"):
        dlgn.beta = -1


def test_state_dict_mirrors_source_and_starts_from_it():
    model = randomize_bn(TinyNet()).eval()
    dlgn = relu2dlgn.convert(model, mode="dlgn")
    src = model.state_dict()
    for prefix, part in (("gating.", dlgn.gating), ("value.", dlgn.value)):
        for k, v in part.state_dict().items():
            assert torch.equal(v, src[k])
            assert f"{prefix}{k}" in dlgn.state_dict()
    assert dlgn.gating.conv1.weight.data_ptr() != dlgn.value.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()
    assert not dlgn.training and model.training is False


def test_batchnorm_stays_a_module_for_timm_norm_act():
    """timm's BatchNormAct2d: the norm is one module (train/eval work), its act is a gate site."""
    model = build("timm:regnetx_002")
    dlgn = relu2dlgn.convert(model, mode="dlgn")
    bns = [m for m in dlgn.value.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert type(model.stem.bn).__name__ == "BatchNormAct2d"
    assert set(dlgn.value.state_dict()) == set(model.state_dict())
    dlgn.train()
    before = dlgn.value.get_buffer("stem.bn.running_mean").clone()
    dlgn(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, dlgn.value.get_buffer("stem.bn.running_mean"))


def test_source_model_untouched():
    model = randomize_bn(TinyNet()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dlgn = relu2dlgn.convert(model, mode="dlgn")
    assert model.training and dlgn.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------
# shape specialisation (timm VGG head) and errors
# ---------------------------------------------------------------------------------------------------

def test_shape_specialisation_is_checked_at_call_time():
    model = build("timm:vgg11")
    dlgn = relu2dlgn.convert(model, mode="dgn").eval()          # default example: 224 px (pretrained_cfg)
    assert dlgn.report.specialised and "pre_logits" in dlgn.report.specialised[0]
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert rel_err(dlgn(x), model(x)) <= 1e-5
        with pytest.raises(relu2dlgn.SpecialisationError, match="pre_logits.*example_inputs"):
            dlgn(torch.randn(2, 3, 64, 64))


def test_error_no_gate_site():
    with pytest.raises(relu2dlgn.ConversionError, match="no gate site"):
        relu2dlgn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Identity()))


def test_error_strict_dlgn_lists_every_nonlinearity():
    import timm
    model = timm.create_model("seresnet18", pretrained=False)
    with pytest.raises(relu2dlgn.ConversionError) as info:
        relu2dlgn.convert(model, mode="dlgn")
    msg = str(info.value)
    for block in ("layer1.0.se", "layer1.1.se", "layer2.0.se", "layer4.1.se"):
        assert f"'{block}.gate'" in msg and "sigmoid" in msg.lower()
    assert msg.count("Tensor.sigmoid at node") == 8 and msg.count("operator.mul of two input-dependent") == 8
    dlgn = relu2dlgn.convert(model, mode="dlgn", strict=False)
    assert len(dlgn.report.nonlinear_kept) == 16 and "layer3.1.se" in str(dlgn.report)
    dgn = relu2dlgn.convert(randomize_bn(model).eval(), mode="dgn").eval()      # DGN exact with SE blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(dgn(x), model(x)) <= 1e-5


class _Untraceable(nn.Module):
    def forward(self, x):
        return torch.relu(x) if x.sum() > 0 else x          # data-dependent control flow


class _HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.ReLU(), _Untraceable())

    def forward(self, x):
        return self.block(self.conv(x))


class _Tracefails(nn.Module):
    def forward(self, x):
        if not isinstance(x, torch.Tensor):       # a type check that torch.fx proxies fail
            raise TypeError(f"expected a tensor, got {type(x).__name__}")
        return torch.relu(x)


def test_error_data_dependent_control_flow_names_module():
    with pytest.raises(relu2dlgn.ConversionError, match=r"data-dependent control flow at module 'block\.1'"):
        relu2dlgn.convert(_HasUntraceable(), mode="dgn", example_inputs=torch.randn(1, 3, 4, 4))


def test_untraceable_module_remedy_leaf_modules():
    model = _HasUntraceable().eval()
    for leaf in (("block.1",), (_Untraceable,)):
        dgn = relu2dlgn.convert(model, mode="dgn", leaf_modules=leaf).eval()
        x = torch.randn(2, 3, 4, 4)
        assert torch.allclose(dgn(x), model(x))
        assert len(dgn.sites) == 1


def test_error_untraceable_names_path():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.ReLU(), _Tracefails()))
    with pytest.raises(relu2dlgn.ConversionError, match=r"cannot trace module '1\.1' \(_Tracefails\).*leaf_modules"):
        relu2dlgn.convert(model, mode="dgn")


def test_error_wrong_rank_dtype_device():
    dlgn = relu2dlgn.convert(TinyNet(), mode="dlgn").eval()
    with pytest.raises(relu2dlgn.InputError, match=r"input 0 \('x'\) must have rank 4.*\(3, 16, 16\)"):
        dlgn(torch.randn(3, 16, 16))
    with pytest.raises(relu2dlgn.InputError, match="dtype torch.float64"):
        dlgn(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(relu2dlgn.InputError, match="on meta"):
        dlgn(torch.randn(1, 3, 16, 16, device="meta"))
    with pytest.raises(relu2dlgn.InputError, match="expects 1 input"):
        dlgn(torch.randn(1, 3, 16, 16), torch.randn(1))


def test_error_bad_arguments():
    with pytest.raises(relu2dlgn.ConversionError, match="mode must be one of"):
        relu2dlgn.convert(TinyNet(), mode="relu")
    with pytest.raises(relu2dlgn.ConversionError, match="value_input"):
        relu2dlgn.convert(TinyNet(), value_input="zeros")
    with pytest.raises(relu2dlgn.ConversionError, match="pool"):
        relu2dlgn.convert(TinyNet(), pool="max")
    with pytest.raises(relu2dlgn.ConversionError, match="meta device"):
        with torch.device("meta"):
            m = TinyNet()
        relu2dlgn.convert(m)


def test_half_precision_model_converts_and_checks_input_dtype():
    model = randomize_bn(AllForms()).eval().half()
    x = torch.randn(2, 3, 16, 16).half()
    dgn = relu2dlgn.convert(model, mode="dgn").eval()
    with torch.no_grad():
        assert rel_err(dgn(x)[0].float(), model(x)[0].float()) <= 2e-3       # slopes rounded to half
        with pytest.raises(relu2dlgn.InputError, match=r"dtype torch\.float32 but the model's parameters are torch\.float16"):
            dgn(x.float())

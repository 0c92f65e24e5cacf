"""capture(): module paths, leaf policy, concrete re-tracing with guards."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from relu2dlgn.capture import capture
from relu2dlgn.leaves import split_norm_act
from _models import rel_err


class _Inner(nn.Module):
    def forward(self, x):
        return F.relu(x) + 1


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), _Inner())

    def forward(self, x):
        return self.block(x).relu()


def test_nodes_record_module_path():
    cap = capture(_Outer())
    paths = {n.name: n.meta["module_path"] for n in cap.graph.nodes}
    assert paths["relu"] == "block.1" and paths["block_0"] == "block.0" and paths["relu_1"] == ""
    sites = relu2dlgn.convert(_Outer()).sites
    assert [(s.module_path, s.op) for s in sites] == [("block.1", "F.relu"), ("", "Tensor.relu")]


def test_norm_act_split_shares_parameters():
    from timm.layers import BatchNormAct2d
    m = BatchNormAct2d(4)
    norm, after = split_norm_act(m)
    assert type(norm) is nn.BatchNorm2d and after == ["act"]
    assert norm.weight is m.weight and norm.running_mean is m.running_mean
    assert "act" not in dict(norm.named_children()) and "act" in dict(m.named_children())
    assert split_norm_act(nn.BatchNorm2d(4)) is None


def test_drop_path_stays_a_leaf_and_eval_is_exact():
    import timm
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.2).eval()
    dgn = relu2dlgn.convert(model, mode="dgn").eval()
    targets = {n.target for n in dgn.value.graph.nodes if n.op == "call_module"}
    assert "layer4.1.drop_path" in targets                     # (layer1.0's rate is 0: an Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(dgn(x), model(x)) <= 1e-6


class _ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if x.shape[-1] > 8:
            x = F.max_pool2d(x, 2)
        return x.mean((2, 3))


def test_concrete_retrace_guards_gating_and_value():
    m = _ShapeBranch().eval()
    d = relu2dlgn.convert(m, mode="dgn", example_inputs=torch.randn(1, 3, 16, 16)).eval()
    assert [s.kind for s in d.sites] == ["relu", "maxpool"]
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(d(x), m(x))
    with pytest.raises(relu2dlgn.SpecialisationError, match=r"module '<root>'.*x\.shape\[-1\] > 8.*True but is False"):
        d.gates(torch.randn(2, 3, 8, 8))               # the gating graph checks it too
    small = relu2dlgn.convert(m, mode="dgn", example_inputs=torch.randn(1, 3, 8, 8)).eval()
    assert [s.kind for s in small.sites] == ["relu"]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(small(x), m(x))


class _NoLayers(nn.Module):
    def forward(self, x):
        if x.shape[-1] > 8:
            x = F.max_pool2d(x, 2)
        return F.relu(x)


def test_concrete_retrace_example_defaults_and_requirement():
    d = relu2dlgn.convert(_ShapeBranch(), mode="dgn")       # default example from the first conv: 224 px
    assert [s.kind for s in d.sites] == ["relu", "maxpool"]
    with pytest.raises(relu2dlgn.ConversionError, match="needs concrete shapes.*example_inputs"):
        relu2dlgn.convert(_NoLayers())


def test_train_eval_graph_difference_is_reported():
    import torchvision
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    dlgn = relu2dlgn.convert(model, mode="dgn")
    assert dlgn.report.train_differs == "AuxLogits"
    assert "differs between train() and eval()" in str(dlgn.report)
    assert relu2dlgn.convert(_Outer()).report.train_differs is None

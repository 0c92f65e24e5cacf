"""The allow-list of strict DLGN conversion (relu2dlgn.affine) and the numeric proof (relu2dlgn.verify).

The reference for "affine" is numerical: in float64, ``f(a x1 + (1 - a) x2) == a f(x1) + (1 - a) f(x2)`` for
the gating graph (in the input) and for the value graph (in its value input, gates fixed). The ops inserted are
the broad list of _ops.py; the property test inserts them at random into generated networks (_generated.py).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

import relu2dlgn
from relu2dlgn import sites as sites_module
from _generated import GenNet, Plan, plans
from _ops import AFFINE, NONLINEAR, OPS, LeafRelu


def _input(plan: Plan, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, plan.in_chans, plan.size, plan.size, generator=g, dtype=torch.float64)


def _outs(y):
    return y if isinstance(y, tuple) else (y,)


def affinity_error(f, x1: torch.Tensor, x2: torch.Tensor, a: float = 0.3) -> float:
    """Largest ``|f(mix) - (a f(x1) + (1-a) f(x2))|`` over the outputs, relative to each output's size (at least
    1e-6 of the largest output's: an output that is identically ~0, like ``x - x.flip(-1)`` averaged, is rounding
    noise relative to itself)."""
    with torch.no_grad():
        triples = list(zip(_outs(f(a * x1 + (1 - a) * x2)), _outs(f(x1.clone())), _outs(f(x2.clone()))))
    scales = [max(y1.abs().max().item(), y2.abs().max().item(), m.abs().max().item()) for m, y1, y2 in triples]
    floor = max(1e-6 * max(scales), 1e-300)
    return max((m - (a * y1 + (1 - a) * y2)).abs().max().item() / max(s, floor)
               for (m, y1, y2), s in zip(triples, scales))


def _convert(model, **kwargs):
    return relu2dlgn.convert(model, mode="dlgn", leaf_modules=(LeafRelu,), **kwargs)


def _one_op_plan(name: str) -> Plan:
    """conv -> relu -> <op> -> conv -> relu -> head: the op sits between two gate sites."""
    return Plan(in_chans=3, size=6, planted=2, steps=[
        ("conv", 4, 3, 1), ("gate", "relu", "functional"), ("op", name), ("conv", 4, 3, 1),
        ("gate", "relu", "functional"), ("head", 3)])


TOL = 1e-7  # float64; cancellations (x - x.mean()) leave ~1e-9 relative rounding, real nonlinearities >= 1e-3


def _assert_faithful(dlgn: relu2dlgn.DLGN, plan: Plan) -> None:
    dlgn = dlgn.eval().double()
    x1, x2 = _input(plan), _input(plan, seed=1)
    assert affinity_error(lambda t: tuple(dlgn.gating(t)), x1, x2) <= TOL
    with torch.no_grad():
        gates = dlgn.gates(x1.clone(), hard=True)
    assert affinity_error(lambda v: dlgn.value(v, *gates), x1, x2) <= TOL


@pytest.mark.parametrize("name", [op.name for op in AFFINE])
def test_affine_op_is_accepted_and_gating_is_affine(name):
    """Every op of the affine list is accepted by strict conversion, and what is built is affine (reference:
    the numerical affinity test, with the conversion's own check switched off)."""
    plan = _one_op_plan(name)
    dlgn = _convert(GenNet(plan).eval(), verify=False)
    assert dlgn.report.nonlinear_kept == []
    _assert_faithful(dlgn, plan)


@pytest.mark.parametrize("name", [op.name for op in NONLINEAR])
def test_non_affine_op_is_refused_by_name(name):
    """Every op of the nonlinear list is refused by strict conversion, named with its node; kept with
    strict=False (then the gating pre-activation after it really is not affine: the refusal was needed)."""
    plan = _one_op_plan(name)
    model = GenNet(plan).eval()
    with pytest.raises(relu2dlgn.ConversionError, match="strict DLGN conversion") as info:
        _convert(model, verify=False)
    assert OPS[name].refused in str(info.value)
    assert " at node '" in str(info.value)
    if name == "dropout(training=True)":       # random: no function to test for affinity
        return
    kept = _convert(model, strict=False, verify=False).eval().double()
    assert any(OPS[name].refused in str(n) for n in kept.report.nonlinear_kept)
    assert affinity_error(lambda t: tuple(kept.gating(t))[1], _input(plan), _input(plan, seed=1)) > 1e-6


@given(plans(max_steps=10, ops=True))
def test_inserted_ops_strict_conversion_is_affine_or_names_the_op(plan):
    """Random ops from a broad list (torch functions, Tensor methods, modules, TorchScript and user leaves)
    inserted into generated networks: strict conversion succeeds => the gating graph is affine in the input and
    the value graph in its value input (float64, numerically); it is refused => the message names an inserted op
    that is not affine, and every such op; a network whose inserted ops are all affine is accepted."""
    model = GenNet(plan).eval()
    inserted = [OPS[step[1]] for step in plan.steps if step[0] == "op"]
    nonaffine = [op for op in inserted if op.refused is not None]
    try:
        dlgn = _convert(model, verify=False)
    except relu2dlgn.ConversionError as exc:
        message = str(exc)
        assert message.startswith("strict DLGN conversion"), message
        assert nonaffine, f"refused although every inserted op is affine: {message}"
        for op in nonaffine:
            assert op.refused in message, (op.name, message)
        return
    assert not nonaffine, [op.name for op in nonaffine]
    _assert_faithful(dlgn, plan)


# --------------------------------------------------------------------------------------------------
# the numeric proof at conversion
# --------------------------------------------------------------------------------------------------

def test_verify_names_the_first_site_that_is_not_affine(monkeypatch):
    """With the allow-list switched off (every op passes), the proof at conversion still refuses a gating graph
    that is not affine, naming the first site after the op; verify=False builds it (and it is not affine)."""
    plan = _one_op_plan("torch.square")
    model = GenNet(plan).eval()
    monkeypatch.setattr(sites_module, "non_affine", lambda *args: None)
    with pytest.raises(relu2dlgn.ConversionError, match=r"site 1 \(relu, F.relu at node 'relu_1'.*not affine"):
        _convert(model)
    dlgn = _convert(model, verify=False).eval().double()
    assert affinity_error(lambda t: tuple(dlgn.gating(t))[1], _input(plan), _input(plan, seed=1)) > 1e-3


def test_verify_reports_what_it_checked():
    plan = _one_op_plan("conv")
    model = GenNet(plan).eval()
    dlgn = _convert(model)
    assert dlgn.report.verified.startswith("gating affine at 2/2 sites")
    assert "value graph affine" in dlgn.report.verified and "float64" in dlgn.report.verified
    dgn = relu2dlgn.convert(model, mode="dgn")
    assert dgn.report.verified.startswith("DGN reproduces the source")
    assert _convert(model, verify=False).report.verified is None


def test_verify_skips_sites_after_a_kept_nonlinearity():
    """strict=False: the site after the kept op is not checked (it is not affine), the one before it is."""
    plan = _one_op_plan("torch.square")
    dlgn = _convert(GenNet(plan).eval(), strict=False)
    assert dlgn.report.verified.startswith("gating affine at 1/2 sites")
    assert "value graph not checked" in dlgn.report.verified


def test_verify_leaves_the_model_as_it_was():
    """The check casts in place and back: dtype, values, parameter identity and train flags are restored, and
    the global random state is not consumed."""
    plan = _one_op_plan("batch norm")
    model = GenNet(plan).train()
    dlgn = _convert(model, verify=False).train()
    before = {k: v.clone() for k, v in dlgn.state_dict().items()}
    params = list(dlgn.parameters())
    from relu2dlgn.verify import verify
    example = (torch.randn(1, 3, 6, 6),)
    torch.manual_seed(5)
    text = verify(dlgn, model, example, unchecked_sites=set(), check_value=True)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))         # the check draws from its own generator
    assert text.startswith("gating affine at 2/2 sites")
    assert dlgn.training and model.training
    assert [p is q for p, q in zip(dlgn.parameters(), params)] == [True] * len(params)
    for k, v in dlgn.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


# --------------------------------------------------------------------------------------------------
# data dependence through storage
# --------------------------------------------------------------------------------------------------

class _ShapeAfterInplace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()                                   # an in-place write into y's storage
        n = y.shape[0]                              # then shape queries on it: not data
        z = y.view(n, y.shape[1], -1).mean(-1) / (y.shape[2] % 5 + 1)
        return self.fc(z).relu()


def test_shape_queries_of_a_written_tensor_are_not_data():
    """Found by the zoo sweep (eca_vovnet39b, botnet26t, halonet_h1, resnest26d were refused for a view / == / % /
    // on x.shape): shape tuples were put in the storage group of their tensor, and an in-place ReLU into that
    storage made them input-dependent. Reference: the numerical affinity test."""
    model = _ShapeAfterInplace().eval()
    dlgn = relu2dlgn.convert(model, mode="dlgn", verify=False).eval().double()
    assert dlgn.report.nonlinear_kept == []
    x1, x2 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert affinity_error(lambda t: tuple(dlgn.gating(t)), x1, x2) <= TOL


class _ProductAfterWrite(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        h = self.conv(x).relu()
        buf = torch.zeros_like(h)                   # made from a shape only: not input-dependent...
        buf[:, :1] = h[:, :1]                       # ...until input-dependent data is written into it
        return (buf * buf).relu()


def test_a_tensor_written_with_input_data_is_input_dependent():
    with pytest.raises(relu2dlgn.ConversionError, match="operator.mul of two input-dependent tensors"):
        relu2dlgn.convert(_ProductAfterWrite().eval(), mode="dlgn", verify=False)

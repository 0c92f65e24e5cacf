"""sites.py on hand-built torch.fx graphs: gate classification, in-place detection, non-gate nonlinearities.

Every classification is checked twice: against the expectation written out from the README's gate table, and
against the eager op itself (the graph is run: the op's output must equal the closed form rebuilt from the
classified kind and parameters, and the caller's tensor must change exactly when the site is classified in
place). Non-gate nonlinearities are checked against a numerical affinity test of the graph they sit in.
"""
from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from relu2dlgn import gates as G
from relu2dlgn.capture import capture
from relu2dlgn.errors import ConversionError
from relu2dlgn.gates import GateSpec, PoolGeometry
from relu2dlgn.sites import GateSite, classify_gate, find_sites, is_inplace


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def one_op(op, target, args=lambda g, x: (x,), kwargs=None, modules=None, attrs=None):
    """A graph ``x -> op(*args(x), **kwargs) -> output`` plus the ``modules`` dict capture() would give.

    ``attrs`` (name -> tensor) become get_attr nodes, passed to ``args`` as ``g.attrs[name]``."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.attrs = {name: g.get_attr(name) for name in (attrs or {})}
    node = g.create_node(op, target, args(g, x), dict(kwargs or {}))
    g.output(node)
    mods = {**(modules or {}), **(attrs or {})}
    return g, node, mods


def run(g, mods, *inputs):
    return fx.GraphModule(dict(mods), g)(*inputs)


def eager_mutates(g, mods, x):
    """Independent reference for "in place": does running the graph change the caller's tensor?"""
    before = x.clone()
    run(g, mods, x)
    return not torch.equal(x, before)


def is_affine(g, mods, shape=(2, 3, 5, 5), a=0.3):
    """Numerical reference: f(a x1 + (1-a) x2) == a f(x1) + (1-a) f(x2) for the graph's function (float64)."""
    gm = fx.GraphModule(dict(mods), g).double()
    torch.manual_seed(0)
    x1, x2 = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64) + 0.5
    with torch.no_grad():
        mixed = gm(a * x1 + (1 - a) * x2)
        ref = a * gm(x1) + (1 - a) * gm(x2)
    return torch.allclose(mixed, ref, rtol=1e-9, atol=1e-9)


def closed_form(kind, params, x, weight=None):
    """The activation rebuilt from a classified kind and its parameters (written from the README table)."""
    if kind == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    if kind == "leaky_relu":
        return torch.where(x > 0, x, x * params["negative_slope"])
    if kind == "prelu":
        return torch.where(x > 0, x, x * weight.reshape(1, -1, *([1] * (x.dim() - 2))))
    if kind == "hardtanh":
        return torch.minimum(torch.maximum(x, torch.tensor(params["lo"])), torch.tensor(params["hi"]))
    raise AssertionError(kind)


def _x(shape=(2, 3, 4, 4), seed=0):
    torch.manual_seed(seed)
    return torch.randn(shape) * 3


# --------------------------------------------------------------------------------------------------
# classify_gate: activations
# --------------------------------------------------------------------------------------------------

W3 = torch.tensor([0.1, -0.2, 0.3])

# id, (op, target, args, kwargs, modules, attrs), expected (kind, op name, inplace, params)
ACTIVATION_FORMS = [
    ("nn.ReLU", ("call_module", "act", None, None, {"act": nn.ReLU()}, None),
     ("relu", "nn.ReLU", False, {})),
    ("nn.ReLU(inplace)", ("call_module", "act", None, None, {"act": nn.ReLU(inplace=True)}, None),
     ("relu", "nn.ReLU(inplace=True)", True, {})),
    ("F.relu", ("call_function", F.relu, None, None, None, None), ("relu", "F.relu", False, {})),
    ("F.relu(x, True)", ("call_function", F.relu, lambda g, x: (x, True), None, None, None),
     ("relu", "F.relu", True, {})),
    ("F.relu(inplace=True)", ("call_function", F.relu, None, {"inplace": True}, None, None),
     ("relu", "F.relu", True, {})),
    ("torch.relu", ("call_function", torch.relu, None, None, None, None), ("relu", "torch.relu", False, {})),
    ("torch.relu_", ("call_function", torch.relu_, None, None, None, None), ("relu", "torch.relu_", True, {})),
    ("F.relu_", ("call_function", F.relu_, None, None, None, None), ("relu", "torch.relu_", True, {})),
    ("Tensor.relu", ("call_method", "relu", None, None, None, None), ("relu", "Tensor.relu", False, {})),
    ("Tensor.relu_", ("call_method", "relu_", None, None, None, None), ("relu", "Tensor.relu_", True, {})),
    ("nn.LeakyReLU(0.2)", ("call_module", "act", None, None, {"act": nn.LeakyReLU(0.2)}, None),
     ("leaky_relu", "nn.LeakyReLU(0.2)", False, {"negative_slope": 0.2})),
    ("nn.LeakyReLU(inplace)", ("call_module", "act", None, None, {"act": nn.LeakyReLU(0.3, inplace=True)}, None),
     ("leaky_relu", "nn.LeakyReLU(0.3)", True, {"negative_slope": 0.3})),
    ("F.leaky_relu defaults", ("call_function", F.leaky_relu, None, None, None, None),
     ("leaky_relu", "F.leaky_relu(0.01)", False, {"negative_slope": 0.01})),
    ("F.leaky_relu positional", ("call_function", F.leaky_relu, lambda g, x: (x, 0.25, True), None, None, None),
     ("leaky_relu", "F.leaky_relu(0.25)", True, {"negative_slope": 0.25})),
    ("F.leaky_relu keywords", ("call_function", F.leaky_relu, None, {"negative_slope": 0.25, "inplace": True},
                               None, None),
     ("leaky_relu", "F.leaky_relu(0.25)", True, {"negative_slope": 0.25})),
    ("F.leaky_relu_ defaults", ("call_function", F.leaky_relu_, None, None, None, None),
     ("leaky_relu", "F.leaky_relu(0.01)", True, {"negative_slope": 0.01})),
    ("F.leaky_relu_(0.2)", ("call_function", F.leaky_relu_, lambda g, x: (x, 0.2), None, None, None),
     ("leaky_relu", "F.leaky_relu(0.2)", True, {"negative_slope": 0.2})),
    ("nn.ReLU6", ("call_module", "act", None, None, {"act": nn.ReLU6()}, None),
     ("hardtanh", "nn.ReLU6", False, {"lo": 0.0, "hi": 6.0})),
    ("nn.ReLU6(inplace)", ("call_module", "act", None, None, {"act": nn.ReLU6(inplace=True)}, None),
     ("hardtanh", "nn.ReLU6", True, {"lo": 0.0, "hi": 6.0})),
    ("F.relu6", ("call_function", F.relu6, None, None, None, None),
     ("hardtanh", "F.relu6", False, {"lo": 0.0, "hi": 6.0})),
    ("F.relu6(inplace=True)", ("call_function", F.relu6, None, {"inplace": True}, None, None),
     ("hardtanh", "F.relu6", True, {"lo": 0.0, "hi": 6.0})),
    ("nn.Hardtanh(lo,hi)", ("call_module", "act", None, None, {"act": nn.Hardtanh(-0.5, 0.7)}, None),
     ("hardtanh", "nn.Hardtanh(-0.5, 0.7)", False, {"lo": -0.5, "hi": 0.7})),
    ("nn.Hardtanh(inplace)", ("call_module", "act", None, None, {"act": nn.Hardtanh(-2.0, 1.5, inplace=True)}, None),
     ("hardtanh", "nn.Hardtanh(-2.0, 1.5)", True, {"lo": -2.0, "hi": 1.5})),
    ("F.hardtanh defaults", ("call_function", F.hardtanh, None, None, None, None),
     ("hardtanh", "F.hardtanh(-1.0, 1.0)", False, {"lo": -1.0, "hi": 1.0})),
    ("F.hardtanh positional", ("call_function", F.hardtanh, lambda g, x: (x, -2.0, 3.0, True), None, None, None),
     ("hardtanh", "F.hardtanh(-2.0, 3.0)", True, {"lo": -2.0, "hi": 3.0})),
    ("F.hardtanh keywords", ("call_function", F.hardtanh, None, {"min_val": -2.0, "max_val": 3.0}, None, None),
     ("hardtanh", "F.hardtanh(-2.0, 3.0)", False, {"lo": -2.0, "hi": 3.0})),
    ("F.hardtanh_", ("call_function", F.hardtanh_, lambda g, x: (x, -0.5, 0.5), None, None, None),
     ("hardtanh", "F.hardtanh(-0.5, 0.5)", True, {"lo": -0.5, "hi": 0.5})),
]


@pytest.mark.parametrize("form, expected", [pytest.param(f, e, id=i) for i, f, e in ACTIVATION_FORMS])
def test_classify_activation_forms(form, expected):
    """Each activation form of the README table is classified with the right kind, op name, in-place flag and
    parameters; the closed form rebuilt from kind+params equals the eager op's output, and the caller's
    tensor changes exactly when the site is classified in place."""
    op, target, args, kwargs, modules, attrs = form
    g, node, mods = one_op(op, target, args or (lambda g, x: (x,)), kwargs, modules, attrs)
    c = classify_gate(node, mods)
    assert c is not None
    assert (c.kind, c.op, c.inplace, c.params) == expected
    assert c.input is next(n for n in g.nodes if n.op == "placeholder")

    x = _x()
    eager = run(g, mods, x.clone())
    assert torch.equal(eager, closed_form(c.kind, c.params, x))
    assert eager_mutates(g, mods, x.clone()) == c.inplace


def test_classify_prelu_module_and_functional():
    """nn.PReLU is a 'prelu' site whose weight is named by module path; F.prelu's weight is the weight node
    itself. The closed form with that weight reproduces the eager op."""
    prelu = nn.PReLU(3)
    with torch.no_grad():
        prelu.weight.copy_(W3)
    g, node, mods = one_op("call_module", "blk.prelu", modules={"blk.prelu": prelu})
    c = classify_gate(node, mods)
    assert (c.kind, c.op, c.inplace, c.params, c.weight) == ("prelu", "nn.PReLU", False, {"num_parameters": 3},
                                                              "blk.prelu.weight")
    x = _x()
    assert torch.equal(run(g, mods, x), closed_form("prelu", c.params, x, W3))

    g, node, mods = one_op("call_function", F.prelu, lambda g, x: (x, g.attrs["w"]), attrs={"w": W3.clone()})
    c = classify_gate(node, mods)
    assert (c.kind, c.op, c.inplace, c.params) == ("prelu", "F.prelu", False, {})
    assert c.weight is g.attrs["w"] and c.weight.op == "get_attr"
    assert torch.equal(run(g, mods, x), closed_form("prelu", c.params, x, W3))


def test_non_gate_nodes_are_not_classified():
    """Linear ops, other nonlinearities and non-gate methods are not gate sites."""
    cases = [
        one_op("call_module", "conv", modules={"conv": nn.Conv2d(3, 3, 1)}),
        one_op("call_module", "sig", modules={"sig": nn.Sigmoid()}),
        one_op("call_module", "pool", modules={"pool": nn.AvgPool2d(2)}),
        one_op("call_function", operator.add, lambda g, x: (x, 1.0)),
        one_op("call_function", torch.sigmoid),
        one_op("call_function", F.avg_pool2d, lambda g, x: (x, 2)),
        one_op("call_method", "add", lambda g, x: (x, 1.0)),
        one_op("call_method", "clamp", kwargs={"min": 0.0}),
    ]
    for g, node, mods in cases:
        assert classify_gate(node, mods) is None, node.format_node()


# --------------------------------------------------------------------------------------------------
# classify_gate: max-pooling
# --------------------------------------------------------------------------------------------------

POOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
POOL_MODULE = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
SPATIAL = {1: (11,), 2: (9, 10), 3: (7, 8, 9)}

# (ndim, kernel, stride, padding, dilation, ceil_mode) and the normalised geometry written out by hand
POOL_CASES = [
    (1, 3, 2, 1, 2, True, dict(kernel_size=[3], stride=[2], padding=[1], dilation=[2], ceil_mode=True)),
    (2, (3, 2), (2, 1), (1, 0), (1, 2), True,
     dict(kernel_size=[3, 2], stride=[2, 1], padding=[1, 0], dilation=[1, 2], ceil_mode=True)),
    (2, 3, 2, 1, 1, False, dict(kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1], ceil_mode=False)),
    (3, 2, 1, 1, 2, False, dict(kernel_size=[2, 2, 2], stride=[1, 1, 1], padding=[1, 1, 1], dilation=[2, 2, 2],
                                ceil_mode=False)),
    (3, (2, 3, 2), (2, 2, 1), (0, 1, 1), 1, True,
     dict(kernel_size=[2, 3, 2], stride=[2, 2, 1], padding=[0, 1, 1], dilation=[1, 1, 1], ceil_mode=True)),
]
POOL_IDS = [f"{c[0]}d-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-ceil{c[5]}" for c in POOL_CASES]
ARG_NAMES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _pool_forms(nd, k, s, p, d, ceil):
    """The module and both functional spellings (all positional / all keywords) of one pool call."""
    vals = (k, s, p, d, ceil)
    mod = POOL_MODULE[nd](k, s, p, d, ceil_mode=ceil)
    return {
        "module": (one_op("call_module", "features.pool", modules={"features.pool": mod}), type(mod).__name__),
        "positional": (one_op("call_function", POOL_FN[nd], lambda g, x: (x, *vals)), f"F.max_pool{nd}d"),
        "positional+return_indices=False": (
            one_op("call_function", POOL_FN[nd], lambda g, x: (x, *vals, False)), f"F.max_pool{nd}d"),
        "keywords": (one_op("call_function", POOL_FN[nd], kwargs=dict(zip(ARG_NAMES, vals))), f"F.max_pool{nd}d"),
    }


@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_classify_maxpool_geometry_every_spelling(case):
    """nn.MaxPoolNd and F.max_poolNd with every geometry argument given positionally and as keywords give the
    same normalised geometry (as written out by hand); re-running max-pool with that geometry reproduces the
    eager op bit for bit, and PoolGeometry.output_size predicts its output shape."""
    nd, k, s, p, d, ceil, expected = case
    x = _x((2, 3) + SPATIAL[nd])
    for form, ((g, node, mods), op_name) in _pool_forms(nd, k, s, p, d, ceil).items():
        c = classify_gate(node, mods)
        assert (c.kind, c.op, c.inplace) == ("maxpool", op_name, False), form
        assert c.params == {"ndim": nd, **expected}, form
        eager = run(g, mods, x)
        prm = c.params
        again = POOL_FN[nd](x, prm["kernel_size"], prm["stride"], prm["padding"], prm["dilation"], prm["ceil_mode"])
        assert torch.equal(again, eager), form
        assert PoolGeometry.make(nd, prm["kernel_size"], prm["stride"], prm["padding"], prm["dilation"],
                                 prm["ceil_mode"]).output_size(x.shape[2:]) == tuple(eager.shape[2:]), form


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_maxpool_stride_defaults_to_kernel(nd):
    """stride omitted, stride=None (F.*) and stride=[] (torch.max_poolNd) all mean stride == kernel_size, as
    the eager op does."""
    x = _x((1, 2) + SPATIAL[nd])
    torch_fn = {1: torch.max_pool1d, 2: torch.max_pool2d, 3: torch.max_pool3d}[nd]
    forms = [
        one_op("call_module", "pool", modules={"pool": POOL_MODULE[nd](2)}),
        one_op("call_function", POOL_FN[nd], lambda g, x: (x, 2)),
        one_op("call_function", POOL_FN[nd], lambda g, x: (x, 2, None)),
        one_op("call_function", POOL_FN[nd], kwargs={"kernel_size": 2, "stride": None}),
        one_op("call_function", torch_fn, lambda g, x: (x, [2] * nd, [])),
    ]
    for g, node, mods in forms:
        c = classify_gate(node, mods)
        assert c.params["stride"] == c.params["kernel_size"] == [2] * nd, node.format_node()
        explicit = POOL_FN[nd](x, 2, 2)
        assert torch.equal(run(g, mods, x), explicit)


def test_maxpool_return_indices_raises_naming_the_node():
    """return_indices=True (module, keyword, positional) and the *_with_indices functions are refused with a
    ConversionError naming the node and its module path."""
    mod = nn.MaxPool2d(2, return_indices=True)
    forms = [
        one_op("call_module", "stem.pool", modules={"stem.pool": mod}),
        one_op("call_function", F.max_pool2d, lambda g, x: (x, 2), kwargs={"return_indices": True}),
        one_op("call_function", F.max_pool1d, lambda g, x: (x, 2, 2, 0, 1, False, True)),
        one_op("call_function", F.max_pool3d_with_indices, lambda g, x: (x, 2)),
    ]
    for g, node, mods in forms:
        node.meta["module_path"] = "stem.pool"
        with pytest.raises(ConversionError) as err:
            classify_gate(node, mods)
        assert f"node '{node.name}'" in str(err.value) and "stem.pool" in str(err.value)
        assert "indices" in str(err.value)


def test_maxpool_runtime_geometry_raises():
    """A kernel size, or one entry of a stride tuple, computed at run time (an fx.Node) is refused, naming the
    node."""
    forms = [
        one_op("call_function", F.max_pool2d, lambda g, x: (x, g.call_method("size", (x, -1)))),
        one_op("call_function", F.max_pool2d, lambda g, x: (x, 2), kwargs={"stride": (1, 1)}),
        one_op("call_function", F.max_pool1d, lambda g, x: (x, 2, g.call_method("size", (x, 0)))),
    ]
    g, node, _ = forms[1]
    with g.inserting_before(node):
        s = g.call_method("size", (next(iter(g.nodes)), 0))
    node.kwargs = {"stride": (s, 1)}
    for g, node, mods in forms:
        with pytest.raises(ConversionError, match=rf"node '{node.name}'.*computed at run time"):
            classify_gate(node, mods)


# --------------------------------------------------------------------------------------------------
# is_inplace
# --------------------------------------------------------------------------------------------------

INPLACE_CASES = [
    ("Tensor.add_", ("call_method", "add_", lambda g, x: (x, 1.0), None, None), True),
    ("Tensor.relu_", ("call_method", "relu_", None, None, None), True),
    ("Tensor.clamp_", ("call_method", "clamp_", None, {"min": 0.5}, None), True),
    ("operator.iadd", ("call_function", operator.iadd, lambda g, x: (x, 1.0), None, None), True),
    ("operator.imul", ("call_function", operator.imul, lambda g, x: (x, 2.0), None, None), True),
    ("F.relu(inplace=True)", ("call_function", F.relu, None, {"inplace": True}, None), True),
    ("F.relu(x, True)", ("call_function", F.relu, lambda g, x: (x, True), None, None), True),
    ("F.hardtanh(x,lo,hi,True)", ("call_function", F.hardtanh, lambda g, x: (x, -0.5, 0.5, True), None, None), True),
    ("F.leaky_relu_", ("call_function", F.leaky_relu_, None, None, None), True),
    ("torch.relu_", ("call_function", torch.relu_, None, None, None), True),
    ("nn.ReLU(inplace)", ("call_module", "m", None, None, {"m": nn.ReLU(inplace=True)}), True),
    ("nn.Hardtanh(inplace)", ("call_module", "m", None, None, {"m": nn.Hardtanh(inplace=True)}), True),
    # negatives
    ("Tensor.requires_grad_", ("call_method", "requires_grad_", None, None, None), False),
    ("Tensor.add", ("call_method", "add", lambda g, x: (x, 1.0), None, None), False),
    ("operator.add", ("call_function", operator.add, lambda g, x: (x, 1.0), None, None), False),
    ("torch.add", ("call_function", torch.add, lambda g, x: (x, 1.0), None, None), False),
    ("F.relu", ("call_function", F.relu, None, None, None), False),
    ("F.relu(inplace=False)", ("call_function", F.relu, lambda g, x: (x, False), None, None), False),
    ("F.leaky_relu(x, 0.2)", ("call_function", F.leaky_relu, lambda g, x: (x, 0.2), None, None), False),
    ("nn.ReLU", ("call_module", "m", None, None, {"m": nn.ReLU()}), False),
    ("nn.Conv2d", ("call_module", "m", None, None, {"m": nn.Conv2d(3, 3, 1)}), False),
]


@pytest.mark.parametrize("form, expected", [pytest.param(f, e, id=i) for i, f, e in INPLACE_CASES])
def test_is_inplace(form, expected):
    """is_inplace is true for methods ending in '_', in-place operators, F functions / modules with
    inplace=True, and false otherwise (requires_grad_ and share_memory_ excluded); the reference is whether
    running the node changes the caller's tensor and returns that same tensor."""
    op, target, args, kwargs, modules = form
    g, node, mods = one_op(op, target, args or (lambda g, x: (x,)), kwargs, modules)
    assert is_inplace(node, mods) is expected
    x = _x()
    before = x.clone()
    with torch.no_grad():
        out = fx.GraphModule(dict(mods), g)(x)
    mutated = not torch.equal(x, before)
    assert mutated == expected
    if expected:
        assert out.data_ptr() == x.data_ptr()          # mutates *and returns* its first argument


# --------------------------------------------------------------------------------------------------
# find_sites / nonlinear_reason
# --------------------------------------------------------------------------------------------------

W = torch.randn(3, 5, 5)


def _linear_or_not(build, modules=None):
    """Graph ``x -> build(g, x) -> output`` with a parameter ``w`` as get_attr; returns (graph, nonlinearities)."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.w = g.get_attr("w")
    g.output(build(g, x))
    mods = {"w": W.double(), **(modules or {})}
    sites, nonlinear = find_sites(g, mods)
    assert sites == []
    return g, mods, nonlinear


def _call(g, fn, *args, **kwargs):
    return g.call_function(fn, args, kwargs)


def _meth(g, name, *args, **kwargs):
    return g.call_method(name, args, kwargs)


PRODUCT_CASES = [
    pytest.param(lambda g, x: _call(g, operator.mul, x, g.w), id="x*w (parameter)"),
    pytest.param(lambda g, x: _call(g, operator.mul, x, 2.0), id="x*2.0 (constant)"),
    pytest.param(lambda g, x: _call(g, torch.mul, x, g.w), id="torch.mul(x, w)"),
    pytest.param(lambda g, x: _meth(g, "mul", x, g.w), id="x.mul(w)"),
    pytest.param(lambda g, x: _call(g, operator.matmul, x, g.w), id="x @ w"),
    pytest.param(lambda g, x: _call(g, operator.mul, x, x), id="x*x"),
    pytest.param(lambda g, x: _call(g, operator.mul, x, _call(g, operator.add, x, 1.0)), id="x*(x+1)"),
    pytest.param(lambda g, x: _call(g, torch.mul, x, x), id="torch.mul(x, x)"),
    pytest.param(lambda g, x: _meth(g, "mul", x, _meth(g, "sum", x)), id="x.mul(x.sum())"),
    pytest.param(lambda g, x: _call(g, torch.matmul, x, _meth(g, "transpose", x, -1, -2)), id="torch.matmul(x, x^T)"),
    pytest.param(lambda g, x: _call(g, operator.mul, _call(g, operator.mul, x, g.w), x), id="x*w*x"),
]


@pytest.mark.parametrize("build", PRODUCT_CASES)
def test_products_flagged_iff_two_input_dependent_factors(build):
    """A product is a non-gate nonlinearity exactly when both factors depend on the input; the reference is a
    numerical affinity test of the graph (a product with a parameter or constant is linear)."""
    g, mods, nonlinear = _linear_or_not(build)
    assert bool(nonlinear) == (not is_affine(g, mods))
    for n in nonlinear:
        assert n.op.endswith("of two input-dependent tensors")


DIVISION_CASES = [
    ("x / 2", lambda g, x: _call(g, operator.truediv, x, 2.0)),
    ("x / w", lambda g, x: _call(g, operator.truediv, x, g.w)),
    ("torch.div(x, w)", lambda g, x: _call(g, torch.div, x, g.w)),
    ("x.div(3)", lambda g, x: _meth(g, "div", x, 3.0)),
    ("x / x.size(1)", lambda g, x: _call(g, operator.truediv, x, _meth(g, "size", x, 1))),
    ("x / x.shape[-1]", lambda g, x: _call(g, operator.truediv, x,
                                           _call(g, operator.getitem, _call(g, getattr, x, "shape"), -1))),
    ("x / x.sum()", lambda g, x: _call(g, operator.truediv, x, _meth(g, "sum", x))),
    ("1 / x", lambda g, x: _call(g, operator.truediv, 1.0, x)),
    ("torch.div(w, x)", lambda g, x: _call(g, torch.div, g.w, x)),
    ("x.div(x.mean())", lambda g, x: _meth(g, "div", x, _meth(g, "mean", x))),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in DIVISION_CASES])
def test_division_flagged_iff_divisor_depends_on_input(build):
    """Division is a non-gate nonlinearity exactly when the divisor depends on the input data; dividing by a
    shape query (x.size(1), x.shape[-1]) is linear. Reference: numerical affinity of the graph."""
    g, mods, nonlinear = _linear_or_not(build)
    assert bool(nonlinear) == (not is_affine(g, mods))
    for n in nonlinear:
        assert n.op.endswith("by an input-dependent tensor")


SHAPE_CASES = [
    ("x * x.size(0)", lambda g, x: _call(g, operator.mul, x, _meth(g, "size", x, 0))),
    ("x * x.shape[1]", lambda g, x: _call(g, operator.mul, x,
                                          _call(g, operator.getitem, _call(g, getattr, x, "shape"), 1))),
    ("x * x.dim()", lambda g, x: _call(g, operator.mul, x, _meth(g, "dim", x))),
    ("x.mul(x.numel())", lambda g, x: _meth(g, "mul", x, _meth(g, "numel", x))),
    ("x * x.ndim", lambda g, x: _call(g, operator.mul, x, _call(g, getattr, x, "ndim"))),
    ("torch.mul(x, x.size(-1) * x.size(-2))",
     lambda g, x: _call(g, torch.mul, x, _call(g, operator.mul, _meth(g, "size", x, -1), _meth(g, "size", x, -2)))),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in SHAPE_CASES])
def test_shape_queries_are_not_input_dependent(build):
    """Shape queries (size(), shape, dim(), numel(), ndim) carry no input data: scaling by them is linear and
    not flagged (the affinity reference agrees)."""
    g, mods, nonlinear = _linear_or_not(build)
    assert nonlinear == []
    assert is_affine(g, mods)


NONLINEAR_CASES = [
    pytest.param("torch.sigmoid", lambda g, x: _call(g, torch.sigmoid, x), id="torch.sigmoid"),
    pytest.param("F.silu", lambda g, x: _call(g, F.silu, x), id="F.silu"),
    pytest.param("F.elu", lambda g, x: _call(g, F.elu, x), id="F.elu"),
    pytest.param("F.gelu", lambda g, x: _call(g, F.gelu, x), id="F.gelu"),
    pytest.param("torch.exp", lambda g, x: _call(g, torch.exp, x), id="torch.exp"),
    pytest.param("Tensor.exp", lambda g, x: _meth(g, "exp", x), id="Tensor.exp"),
    pytest.param("Tensor.clamp", lambda g, x: _meth(g, "clamp", x, min=0.0), id="Tensor.clamp"),
    pytest.param("Tensor.clamp_min", lambda g, x: _meth(g, "clamp_min", x, 0.0), id="Tensor.clamp_min"),
    pytest.param("torch.clamp", lambda g, x: _call(g, torch.clamp, x, -0.5, 0.5), id="torch.clamp"),
    pytest.param("F.softmax", lambda g, x: _call(g, F.softmax, x, dim=1), id="F.softmax"),
    pytest.param("operator.pow", lambda g, x: _call(g, operator.pow, x, 2), id="x**2"),
    pytest.param("Tensor.square", lambda g, x: _meth(g, "square", x), id="Tensor.square"),
    pytest.param("Tensor.abs", lambda g, x: _meth(g, "abs", x), id="Tensor.abs"),
    pytest.param("F.layer_norm", lambda g, x: _call(g, F.layer_norm, x, (5,)), id="F.layer_norm"),
    # functional spellings of ops whose module or method form the old catalogue of nonlinearities had, and
    # plain elementwise nonlinearities: off the allow-list, so flagged by construction
    pytest.param("torch.clamp_min", lambda g, x: _call(g, torch.clamp_min, x, 0.0), id="torch.clamp_min"),
    pytest.param("torch.maximum", lambda g, x: _call(g, torch.maximum, x, g.w), id="torch.maximum"),
    pytest.param("torch.square", lambda g, x: _call(g, torch.square, x), id="torch.square"),
    pytest.param("torch.reciprocal", lambda g, x: _call(g, torch.reciprocal, x), id="torch.reciprocal"),
    pytest.param("F.softshrink", lambda g, x: _call(g, F.softshrink, x), id="F.softshrink"),
    pytest.param("F.tanhshrink", lambda g, x: _call(g, F.tanhshrink, x), id="F.tanhshrink"),
    pytest.param("Tensor.sin", lambda g, x: _meth(g, "sin", x), id="Tensor.sin"),
]


@pytest.mark.parametrize("name, build", NONLINEAR_CASES)
def test_elementwise_nonlinearities_are_flagged(name, build):
    """Every op that the numerical affinity test finds nonlinear is reported by find_sites, under its name."""
    g, mods, nonlinear = _linear_or_not(build)
    assert not is_affine(g, mods)           # the reference: this op really is nonlinear
    assert [n.op for n in nonlinear] == [name]


def test_nonlinearity_of_constants_only_is_not_flagged():
    """A nonlinearity applied to a parameter (no input dependence) is not a problem for linearity."""
    g, mods, nonlinear = _linear_or_not(lambda g, x: _call(g, operator.add, x, _call(g, torch.sigmoid, g.w)))
    assert nonlinear == []
    assert is_affine(g, mods)


class _RecordCalls(TorchFunctionMode):
    """Names of the torch functions an eager forward calls (outermost calls only)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.sig = nn.Sigmoid()

    def forward(self, x):
        return x * self.sig(x)            # nn.Sigmoid at "head.sig", product of two input-dependent tensors at "head"


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.head = _Gate()
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        y = self.act(self.conv(x))
        y = self.head(y) * self.scale          # product with a parameter: linear
        y = self.norm(y)
        z = F.relu(y / y.size(1))              # division by a shape query: linear
        return torch.tanh(z).exp()


def test_find_sites_on_captured_model_names_nodes_and_module_paths():
    """find_sites on a captured nested model: gate sites in execution order, and every non-gate nonlinearity
    with its node name, module path and op (and nothing else: the parameter product and the division by a
    shape query are linear)."""
    model = _Nested()
    cap = capture(model)
    sites, nonlinear = find_sites(cap.graph, cap.modules)
    assert [(n.name, c.op) for n, c in sites] == [("act", "nn.ReLU"), ("relu", "F.relu")]
    assert [(n.node, n.module_path, n.op) for n in nonlinear] == [
        ("head_sig", "head.sig", "nn.Sigmoid"),
        ("mul", "head", "operator.mul of two input-dependent tensors"),
        ("norm", "norm", "nn.LayerNorm"),
        ("tanh", "", "torch.tanh"),
        ("exp", "", "Tensor.exp"),
    ]
    assert str(nonlinear[0]) == "nn.Sigmoid at node 'head_sig' (module 'head.sig')"
    assert str(nonlinear[-1]) == "Tensor.exp at node 'exp' (module '<root>')"
    # reference: the calls an eager forward makes, in order (two relus; the elementwise nonlinearities in
    # the order reported; the two products)
    with _RecordCalls() as rec:
        model(torch.randn(1, 3, 4, 4))
    assert [c for c in rec.calls if c == "relu"] == ["relu"] * len(sites)
    assert [c for c in rec.calls if c in ("sigmoid", "layer_norm", "tanh", "exp")] == [
        "sigmoid", "layer_norm", "tanh", "exp"]
    assert [c for c in rec.calls if c == "mul"] == ["mul", "mul"]     # one flagged, one (by a parameter) linear


# --------------------------------------------------------------------------------------------------
# GateSite
# --------------------------------------------------------------------------------------------------

def _site_from(node, c, index=0):
    return GateSite(index, c.kind, node.name, node.meta.get("module_path", ""), c.op, c.inplace, dict(c.params))


@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_gatesite_spec_rebuilds_pool_geometry(case):
    """GateSite.spec of a max-pool site is the PoolGeometry of the eager module; its hard gate applied to the
    pre-activation reproduces the eager module's output."""
    nd, k, s, p, d, ceil, _ = case
    mod = POOL_MODULE[nd](k, s, p, d, ceil_mode=ceil)
    g, node, mods = one_op("call_module", "pool", modules={"pool": mod})
    spec = _site_from(node, classify_gate(node, mods)).spec
    assert spec.kind == "maxpool"
    assert spec.pool == PoolGeometry.make(nd, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
    x = _x((2, 3) + SPATIAL[nd], seed=3)
    gate = G.make_gate(spec, x, 1.0, hard=True)
    geo = spec.pool
    out = G.gate_maxpool(x, gate, nd, geo.kernel_size, geo.stride, geo.padding, geo.dilation, geo.ceil_mode)
    assert torch.equal(out, mod(x))


@pytest.mark.parametrize("module, reference", [
    (nn.ReLU(), F.relu),
    (nn.ReLU6(), F.relu6),
    (nn.Hardtanh(-0.5, 0.7), lambda x: F.hardtanh(x, -0.5, 0.7)),
    (nn.LeakyReLU(0.2), None),
], ids=["relu", "relu6", "hardtanh", "leaky"])
def test_gatesite_spec_activation_bounds(module, reference):
    """GateSite.spec of an activation site carries the kind and the hardtanh bounds; the hard gate of that spec
    applied to v == q reproduces the eager activation."""
    g, node, mods = one_op("call_module", "act", modules={"act": module})
    c = classify_gate(node, mods)
    spec = _site_from(node, c).spec
    expected_bounds = {"relu": (0.0, 0.0), "leaky_relu": (0.0, 0.0),
                       "hardtanh": (float(getattr(module, "min_val", 0)), float(getattr(module, "max_val", 0)))}
    assert (spec.kind, spec.lo, spec.hi, spec.pool) == (c.kind, *expected_bounds[c.kind], None)
    x = _x(seed=4)
    gate = G.make_gate(spec, x, 1.0, hard=True)
    if c.kind == "relu":
        out = G.gate_relu(x, gate)
    elif c.kind == "leaky_relu":
        out = G.gate_leaky_relu(x, gate, c.params["negative_slope"])
    else:
        out = G.gate_hardtanh(x, gate, spec.lo, spec.hi)
    assert torch.equal(out, (reference or module)(x))


def test_gatesite_as_dict_round_trip():
    """as_dict is JSON-serialisable and rebuilds an equal GateSite (and so an equal spec)."""
    mod = nn.MaxPool2d((3, 2), (2, 1), (1, 0), (1, 2), ceil_mode=True)
    g, node, mods = one_op("call_module", "layer1.pool", modules={"layer1.pool": mod})
    node.meta["module_path"] = "layer1.pool"
    site = _site_from(node, classify_gate(node, mods), index=7)
    site.shape = (2, 3, 5, 9)
    d = json.loads(json.dumps(site.as_dict()))
    assert d == {"index": 7, "kind": "maxpool", "node": node.name, "module_path": "layer1.pool",
                 "op": "MaxPool2d", "inplace": False, "shape": [2, 3, 5, 9],
                 "params": {"ndim": 2, "kernel_size": [3, 2], "stride": [2, 1], "padding": [1, 0],
                            "dilation": [1, 2], "ceil_mode": True}}
    back = GateSite(**{**d, "shape": tuple(d["shape"])})
    assert back == site and back.spec == site.spec

    g, node, mods = one_op("call_function", F.hardtanh, lambda g, x: (x, -2.0, 3.0))
    site = _site_from(node, classify_gate(node, mods), index=1)
    d = json.loads(json.dumps(site.as_dict()))
    assert d["shape"] is None and d["params"] == {"lo": -2.0, "hi": 3.0}
    back = GateSite(**d)
    assert back == site and back.spec == GateSpec("hardtanh", -2.0, 3.0, None)

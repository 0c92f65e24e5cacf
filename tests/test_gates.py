"""Gate arithmetic against closed forms: each hard gate applied to v == q reproduces its activation, bit for bit
and for every float (infinities, NaN, signed zeros, subnormals); the max-pool gate's formulations against
PyTorch's own max-pool indices."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relu2dlgn import gates as G
from relu2dlgn.gates import GateSpec, PoolGeometry

GEOMETRIES = [  # (ndim, kernel, stride, padding, dilation, ceil_mode)
    (2, 2, 2, 0, 1, False), (2, 3, 2, 1, 1, False), (2, 3, 2, 1, 1, True), (2, 2, 1, 0, 2, False),
    (2, (3, 2), (2, 1), (1, 0), (1, 2), True), (1, 3, 2, 1, 1, True), (3, 2, 2, 0, 1, True), (3, 3, 1, 1, 2, False),
]


def _x(ndim, seed=0):
    torch.manual_seed(seed)
    return torch.randn((2, 3) + (7, 8, 9)[:ndim], dtype=torch.float64)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_maxpool_hard_gate_reproduces_max_pool(geo):
    nd, k, s, p, d, c = geo
    x = _x(nd)
    spec = GateSpec("maxpool", pool=PoolGeometry.make(nd, k, s, p, d, c))
    ref = G._max_pool_fn(nd)(x, k, s, p, d, c)
    g = G.make_gate(spec, x, 1.0, hard=True)
    gp = spec.pool
    out = G.gate_maxpool(x, g, nd, gp.kernel_size, gp.stride, gp.padding, gp.dilation, gp.ceil_mode)
    assert torch.equal(out, ref)
    assert spec.pool.output_size(x.shape[2:]) == tuple(ref.shape[2:])


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_pool_windows_max_and_soft_limit(geo):
    nd, k, s, p, d, c = geo
    x = _x(nd, 1)
    geo_ = PoolGeometry.make(nd, k, s, p, d, c)
    ref = G._max_pool_fn(nd)(x, k, s, p, d, c)
    assert torch.equal(G.pool_windows(x, geo_, float("-inf")).amax(2), ref)
    w = G.make_gate(GateSpec("maxpool", pool=geo_), x, 1e4, hard=False)
    assert torch.allclose(w.sum(2), torch.ones_like(ref))
    soft = G.gate_maxpool(x, w, nd, geo_.kernel_size, geo_.stride, geo_.padding, geo_.dilation, geo_.ceil_mode)
    assert torch.allclose(soft, ref, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 with a gradient: the convolution form
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_avg_standin_is_mean_of_valid_window_elements(geo, dtype):
    nd, k, s, p, d, c = geo
    x = _x(nd, 2).to(dtype).requires_grad_()
    g = PoolGeometry.make(nd, k, s, p, d, c)
    out = G.avg_pool_standin(x, nd, g.kernel_size, g.stride, g.padding, g.dilation, g.ceil_mode)
    xr = x.detach().double().requires_grad_()
    ref = torch.nanmean(G.pool_windows(xr, g, float("nan")), 2)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # without a gradient, float32 too takes the average pool
        plain = G.avg_pool_standin(x, nd, g.kernel_size, g.stride, g.padding, g.dilation, g.ceil_mode)
    torch.testing.assert_close(plain.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    w = torch.randn(ref.shape, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-6, atol=1e-6)


def _hard(kind, q, **kw):
    return G.make_gate(GateSpec(kind, **kw), q, 1.0, hard=True)


def test_relu_family_closed_forms():
    q = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert torch.equal(G.gate_relu(q, _hard("relu", q)), F.relu(q))
    assert torch.equal(G.gate_leaky_relu(q, _hard("leaky_relu", q), 0.1), F.leaky_relu(q, 0.1))
    w = torch.tensor([0.25], dtype=torch.float64)
    assert torch.equal(G.gate_prelu(q, _hard("prelu", q), w), F.prelu(q, w))
    q4 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w3 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    assert torch.equal(G.gate_prelu(q4, _hard("prelu", q4), w3), F.prelu(q4, w3))


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, 1.0), (-0.5, 0.7)])
def test_hardtanh_closed_form_including_ties(lo, hi):
    q = torch.cat([torch.linspace(-8, 8, 161, dtype=torch.float64), torch.tensor([lo, hi], dtype=torch.float64)])
    g = _hard("hardtanh", q, lo=lo, hi=hi)
    assert g.shape == (2, q.numel())
    assert torch.equal(G.gate_hardtanh(q, g, lo, hi), F.hardtanh(q, lo, hi))
    assert torch.equal(G.gate_hardtanh_(q.clone(), g, lo, hi), F.hardtanh(q, lo, hi))


def test_soft_gates_are_sigmoids_and_hard_gates_are_steps():
    q = torch.tensor([-1.0, 0.0, -0.0, 2.0, math.nan, -math.inf, math.inf])
    hard = G.step(q, 5.0, True)
    assert hard.dtype == torch.bool
    assert hard.tolist() == [False, False, False, True, True, False, True]  # off unless q <= 0 fails: NaN is on
    q = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.allclose(G.step(q, 5.0, False), torch.sigmoid(5 * q))
    g = G.make_gate(GateSpec("hardtanh", lo=0.0, hi=6.0), q, 2.0, hard=False)
    assert torch.allclose(g, torch.stack([torch.sigmoid(2 * q), torch.sigmoid(2 * (q - 6))]))


@pytest.mark.parametrize("fn,extra", [(G.gate_relu, ()), (G.gate_leaky_relu, (0.1,)), (G.gate_hardtanh, (-1.0, 1.0))])
def test_gradcheck_value_and_gate(fn, extra):
    q = torch.randn(5, dtype=torch.float64, requires_grad=True)
    kind = {G.gate_relu: "relu", G.gate_leaky_relu: "leaky_relu", G.gate_hardtanh: "hardtanh"}[fn]
    spec = GateSpec(kind, lo=-1.0, hi=1.0)
    v = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, q: fn(v, G.make_gate(spec, q, 3.0, False), *extra), (v, q))


def test_gradcheck_soft_maxpool():
    geo = PoolGeometry.make(2, 3, 2, 1, 1, True)
    q = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(v, q):
        w = G.make_gate(GateSpec("maxpool", pool=geo), q, 2.0, False)
        return G.gate_maxpool(v, w, 2, geo.kernel_size, geo.stride, geo.padding, geo.dilation, geo.ceil_mode)

    assert torch.autograd.gradcheck(f, (v, q))


def test_pool_geometry_rejects_bad_arity():
    with pytest.raises(ValueError, match="expected 2 values"):
        PoolGeometry.make(2, (2, 2, 2))


SPECIAL = torch.tensor([-math.inf, -3e38, -2.5, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 0.5, 1.0, 1.5, 6.0, 7.0,
                        3e38, math.inf, math.nan])


def _same(a, b):
    """Bit-level agreement up to the sign of zero: equal values, NaN where the reference has NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_hard_gates_reproduce_every_activation_at_every_float(dtype):
    """With v == q each hard gate equals the activation itself for every float: where the gate is off the value's
    infinity is not multiplied by 0 (relu(-inf) = 0, hardtanh(+-inf) = hi/lo), NaN passes as NaN, and a
    LeakyReLU of slope 0 gives NaN at -inf exactly as the source does (-inf * 0)."""
    q = SPECIAL.to(dtype)
    assert _same(G.gate_relu(q, _hard("relu", q)), F.relu(q))
    assert _same(G.gate_relu_(q.clone(), _hard("relu", q)), F.relu(q))
    for a in (0.0, 0.1, 2.0):
        assert _same(G.gate_leaky_relu(q, _hard("leaky_relu", q), a), F.leaky_relu(q, a))
        assert _same(G.gate_leaky_relu_(q.clone(), _hard("leaky_relu", q), a), F.leaky_relu(q, a))
    for w in (torch.tensor([0.0]), torch.tensor([0.25])):
        assert _same(G.gate_prelu(q, _hard("prelu", q), w.to(dtype)), F.prelu(q, w.to(dtype)))
    for lo, hi in ((0.0, 6.0), (-1.0, 1.0), (-2.5, 1.5)):
        g = _hard("hardtanh", q, lo=lo, hi=hi)
        assert g.dtype == torch.bool and g.shape == (2, q.numel())
        assert _same(G.gate_hardtanh(q, g, lo, hi), F.hardtanh(q, lo, hi))
        assert _same(G.gate_hardtanh_(q.clone(), g, lo, hi), F.hardtanh(q, lo, hi))


def _pool_inputs(nd, seed):
    """Random values, then heavy ties, ties with infinities, an all -inf tensor and NaNs."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3) + (7, 8, 9)[:nd]
    ints = torch.randint(-2, 2, shape, generator=g).double()
    with_inf = ints.clone()
    with_inf[ints == -2], with_inf[ints == 1] = -math.inf, math.inf
    with_nan = ints.clone()
    with_nan[ints == 0] = math.nan
    return {"random": torch.randn(shape, generator=g, dtype=torch.float64), "ties": ints, "infinities": with_inf,
            "all -inf": torch.full(shape, -math.inf, dtype=torch.float64), "nan": with_nan}


@pytest.mark.parametrize("geo", GEOMETRIES + [(2, 5, 3, 2, 1, True), (2, 3, 3, 1, 2, False), (1, 4, 1, 2, 1, False)])
def test_maxpool_gate_forms_equal_pytorch_indices(geo):
    """Every formulation of the hard max-pool gate gives PyTorch's own max-pool indices (first maximum in scan
    order, the last NaN, never padding, the first position inside the input for an all -inf window); the
    equality formulation is exact except with NaN. The value network's read (gather, or the select chain of the
    portable form) is the element at the index."""
    nd, k, s, p, d, c = geo
    spec = GateSpec("maxpool", pool=PoolGeometry.make(nd, k, s, p, d, c))
    gp = spec.pool
    args = (nd, gp.kernel_size, gp.stride, gp.padding, gp.dilation, gp.ceil_mode)
    for name, x in _pool_inputs(nd, 3).items():
        ref = G._max_pool_fn(nd)(x, k, s, p, d, c, return_indices=True)[1]
        v = torch.randn_like(x)
        picked = v.flatten(2).gather(2, ref.flatten(2)).view(ref.shape)
        for form in ("eager", "portable", "onnx"):
            with G.gate_form(form):
                g = G.make_gate(spec, x, 1.0, hard=True)
                out = G.gate_maxpool(v, ref, *args)
            if form != "onnx" or name != "nan":
                assert g.dtype == torch.int64 and torch.equal(g, ref), (form, name)
            else:  # inside the window all the same
                assert ((g >= 0) & (g < x[0, 0].numel())).all()
            assert torch.equal(out, picked), (form, name)


def test_gate_form_is_checked_and_restored():
    with pytest.raises(ValueError, match="gate form"):
        with G.gate_form("fast"):
            pass
    with G.gate_form("portable"):
        with G.gate_form("onnx"):
            assert G._FORM.get() == "onnx"
        assert G._FORM.get() == "portable"
    assert G._FORM.get() == "eager"


def test_cpu_max_pool_with_indices_equals_the_nchw_kernel_on_ties_and_nan():
    """gates.max_pool_with_indices pools a CPU 4-d tensor channels-last: the same values and indices as the NCHW
    kernel, ties (first maximum), infinities and NaN (wins) included, and contiguous outputs; also where the
    channels-last copy goes 16 channels at a time (planes of 4 KiB, 40 channels: a partial last block)."""
    geo = PoolGeometry.make(2, 3, 2, 1)
    for shape in ((2, 5, 9, 8), (2, 40, 32, 32)):
        q = torch.randn(shape).relu()  # zeros: ties
        q[0, 1, 2, 3] = float("nan")
        q[1, 2, 4:6, 4:6] = float("inf")
        q[1, 3] = float("-inf")
        q[1, -1, :3, :3] = float("nan")
        values, idx = G.max_pool_with_indices(q, geo)
        ref_v, ref_i = F.max_pool2d(q, 3, 2, 1, return_indices=True)
        assert torch.equal(idx, ref_i) and torch.allclose(values, ref_v, equal_nan=True)
        assert values.is_contiguous() and idx.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_hard_gates_on_the_cpu_equal_where_bit_for_bit(dtype):
    """The CPU's bit-operation form of the hard ReLU-family gates returns torch.where's bit patterns (NaN, +-inf
    and -0 included), out of place and in place, with a gate broadcast over the value; a value that needs a
    gradient gets where's gradient."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.5, -2.0], dtype=dtype)
    full = torch.randn(4, 3, 8).to(dtype)
    full.view(-1)[:7] = special
    v = full[:, :, :7]  # strided
    g = torch.randn(v.shape) > 0
    w = torch.rand(3, dtype=dtype)

    def bits(t):
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    # the reference is where() on the very tensor gated: the off piece's NaN payload (v * a) can differ between
    # a strided tensor and its contiguous clone, as PyTorch's strided and vectorised multiply loops differ
    cases = [(G.gate_relu, G.gate_relu_, (), lambda t: torch.where(g, t, 0.0)),
             (G.gate_leaky_relu, G.gate_leaky_relu_, (0.1,), lambda t: torch.where(g, t, t * 0.1)),
             (G.gate_prelu, None, (w,), lambda t: torch.where(g, t, t * w.view(1, -1, 1)))]
    for fn, fn_, args, ref in cases:
        assert torch.equal(bits(fn(v, g, *args)), bits(ref(v))), fn.__name__
        if fn_ is not None:
            x = v.clone()
            expected = ref(x)
            assert fn_(x, g, *args) is x and torch.equal(bits(x), bits(expected)), fn_.__name__
    row = g[:1]  # broadcast over the batch
    assert torch.equal(bits(G.gate_relu(v, row)), bits(torch.where(row, v, 0.0)))
    x = v.clone()
    assert torch.equal(bits(G.gate_relu_(x, row)), bits(torch.where(row, v, 0.0)))
    leaf = v.detach().clone().float().requires_grad_(True)
    G.gate_leaky_relu(leaf, g, 0.1).sum().backward()
    assert torch.equal(leaf.grad, torch.where(g, 1.0, 0.1))

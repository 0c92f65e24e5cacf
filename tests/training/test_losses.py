"""relu2dlgn.training.losses and .schedules: the objective's terms against closed forms."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from relu2dlgn.gates import GateSpec, PoolGeometry, make_gate, pool_windows
from relu2dlgn.training import beta_at, kd_loss, lr_factor, site_gate_terms


def test_gate_terms_math():
    q = torch.tensor([[-1.0, 0.5, 2.0, -0.2]])
    qt = torch.tensor([[-3.0, 1.0, -1.0, 0.3]])
    beta = 4.0
    loss, agree, n = site_gate_terms(GateSpec("relu"), q, qt, beta)
    s = torch.sigmoid(beta * q)
    t = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert torch.allclose(loss, -(t * s.log() + (1 - t) * (1 - s).log()).mean())
    assert (agree.item(), n) == (2, 4)
    # hardtanh: the piece (below lo, linear, above hi) must agree
    ht = GateSpec("hardtanh", lo=-1.0, hi=1.0)
    _, agree, n = site_gate_terms(ht, torch.tensor([-2.0, 0.0, 2.0, 0.5]), torch.tensor([-1.5, 0.9, 0.0, 3.0]), 1.0)
    assert (agree.item(), n) == (2, 4)
    # max-pool: cross-entropy of the window soft-max against the teacher's arg max
    geo = PoolGeometry.make(2, 2)
    mp = GateSpec("maxpool", pool=geo)
    q = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]])
    qt = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]]]])
    loss, agree, n = site_gate_terms(mp, q, qt, 2.0)
    assert torch.allclose(loss, -torch.log_softmax(2.0 * q.flatten(), 0)[0])
    assert (agree.item(), n) == (0, 1)
    assert site_gate_terms(mp, q, q, 1.0, loss=False)[1].item() == 1
    # larger windows, 2-d and 1-d, against pool_windows (window axis 2) with the window axis made last
    for ndim, shape in ((2, (2, 3, 9, 10)), (1, (2, 3, 11))):
        geo = PoolGeometry.make(ndim, 3, 2, 1)
        q, qt = torch.randn(shape), torch.randn(shape)
        wq, wt = pool_windows(q, geo, -math.inf).movedim(2, -1), pool_windows(qt, geo, -math.inf).movedim(2, -1)
        ref = F.cross_entropy((3.0 * wq).reshape(-1, wq.shape[-1]), wt.argmax(-1).reshape(-1))
        loss, agree, n = site_gate_terms(GateSpec("maxpool", pool=geo), q, qt, 3.0)
        assert torch.allclose(loss, ref, atol=1e-6)
        assert agree.item() == (wq.argmax(-1) == wt.argmax(-1)).sum().item() and n == wt[..., 0].numel()


def test_kd_loss_and_schedules():
    z = torch.randn(5, 7)
    assert kd_loss(z, z, 4.0).abs().item() < 1e-6
    t = torch.randn(5, 7)
    p_t = F.softmax(t / 2, 1)
    ref = (p_t * (p_t.log() - F.log_softmax(z / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(kd_loss(z, t, 2.0), ref, atol=1e-6)
    assert beta_at(0, 11, 4, 36, "geometric") == 4 and math.isclose(beta_at(10, 11, 4, 36, "geometric"), 36)
    assert math.isclose(beta_at(5, 11, 4, 36, "geometric"), 12)
    assert beta_at(5, 11, 4, 36, "linear") == 20 and beta_at(7, 11, 4, 36, "constant") == 4
    assert lr_factor(0, 100, 10) == 0.1 and lr_factor(9, 100, 10) == 1.0
    assert math.isclose(lr_factor(55, 100, 10), 0.5) and lr_factor(100, 100, 10) < 1e-12


def test_maxpool_term_gradient_and_ties_against_references():
    """The max-pool term's gradient equals cross_entropy's on unfolded windows; the agreement uses the student's
    *first* maximum (as its hard gate does), so a tie with the teacher's arg max further on is a disagreement."""
    geo = PoolGeometry.make(2, 3, 2, 1)
    spec = GateSpec("maxpool", pool=geo)
    q = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    qt = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    loss, _, _ = site_gate_terms(spec, q, qt, 2.5)
    wq, wt = pool_windows(q, geo, -math.inf).movedim(2, -1), pool_windows(qt, geo, -math.inf).movedim(2, -1)
    ref = F.cross_entropy((2.5 * wq).reshape(-1, 9), wt.argmax(-1).reshape(-1))
    assert torch.allclose(torch.autograd.grad(loss, q)[0], torch.autograd.grad(ref, q)[0])

    two = GateSpec("maxpool", pool=PoolGeometry.make(2, 2))
    q = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])      # a tie: the student's hard gate is offset 0
    first, second = torch.tensor([[[[0]]]]), torch.tensor([[[[1]]]])  # teacher gates (per-plane indices)
    assert site_gate_terms(two, q, first, 1.0)[1].item() == 1
    assert site_gate_terms(two, q, second, 1.0)[1].item() == 0
    assert site_gate_terms(two, q, second, 1.0, loss=False)[1].item() == 0


def test_maxpool_term_from_the_forward_gate_equals_the_unfolded_windows():
    """Given the soft gate of the forward pass, the max-pool term reads the window soft-max from it: the same loss
    and gradient as cross_entropy over the unfolded windows (overlapping, padded, ceil-mode windows; ties), and
    finite where the teacher's element is far below the window maximum (its probability underflows to 0)."""
    for geo, shape in ((PoolGeometry.make(2, 3, 2, 1), (2, 3, 9, 10)),
                       (PoolGeometry.make(2, 2, 2, 0, ceil_mode=True), (2, 2, 7, 5)),
                       (PoolGeometry.make(2, (3, 2), (1, 2), (1, 0), dilation=(2, 1)), (2, 2, 8, 7)),
                       (PoolGeometry.make(3, 2, 2, 1), (2, 2, 4, 5, 3)),
                       (PoolGeometry.make(1, 3, 2, 1), (2, 3, 11))):
        spec = GateSpec("maxpool", pool=geo)
        q = torch.randn(shape, dtype=torch.float64)
        q[0, 0] = q[0, 0].clamp_min(0)  # ReLU'd: ties at 0
        q[1, 0] *= 50  # beta * gap ~ 1e3: exp underflows
        q.requires_grad_(True)
        qt = torch.randn(shape, dtype=torch.float64)
        beta = 2.5
        gate = make_gate(spec, q, beta, hard=False)
        loss, agree, n = site_gate_terms(spec, q, qt, beta, gate=gate)
        ref_loss, ref_agree, ref_n = site_gate_terms(spec, q, qt, beta)
        wq, wt = pool_windows(q, geo, -math.inf).movedim(2, -1), pool_windows(qt, geo, -math.inf).movedim(2, -1)
        ref = F.cross_entropy((beta * wq).reshape(-1, wq.shape[-1]), wt.argmax(-1).reshape(-1))
        assert torch.isfinite(loss) and torch.allclose(loss.double(), ref) and torch.allclose(ref_loss.double(), ref)
        assert torch.allclose(torch.autograd.grad(loss, q)[0], torch.autograd.grad(ref, q)[0], atol=1e-6)
        assert (agree.item(), n) == (ref_agree.item(), ref_n)
    # a hard gate (frozen gating) is not a soft-max: the windows are unfolded as without a gate
    hard = make_gate(spec, q.detach(), beta, hard=True)
    assert torch.allclose(site_gate_terms(spec, q, qt, beta, gate=hard)[0], site_gate_terms(spec, q, qt, beta)[0])


def test_relu_terms_from_the_forward_gate_equal_bce_with_logits():
    """Given the soft gate sigmoid(beta q) of the forward pass, a ReLU-family site's term has BCE-with-logits'
    value and gradient (large |beta q| included), for a float32 gate and a bfloat16 one (recomputed in float32);
    the agreement follows the hard gate not(q <= 0): 0 and -0 are off, NaN is on."""
    for kind in ("relu", "leaky_relu", "prelu"):
        spec = GateSpec(kind)
        q = (torch.randn(4, 6, 5) * 20).requires_grad_(True)
        qt = torch.randn(4, 6, 5)
        beta = 3.0
        ref = F.binary_cross_entropy_with_logits(beta * q, (qt > 0).float())
        for dtype in (torch.float32, torch.bfloat16):
            gate = make_gate(spec, q.to(dtype), beta, hard=False)
            loss, agree, n = site_gate_terms(spec, q, qt, beta, gate=gate)
            assert torch.allclose(loss, ref, rtol=1e-6)
            assert torch.allclose(torch.autograd.grad(loss, q)[0], torch.autograd.grad(ref, q, retain_graph=True)[0],
                                  rtol=1e-5, atol=1e-9)
            assert agree.item() == ((q > 0) == (qt > 0)).sum().item() and n == q.numel()
    # small losses (confident gates, mostly right, |beta q| up to ~300): against float64, the value's error is that
    # of float32 sums, absolute: a few 2^-24 times the mean |beta q|
    torch.manual_seed(1)
    for scale, shape in ((0.3, (4, 6, 5)), (3.0, (4, 6, 5)), (30.0, (4, 6, 5)), (3.0, (7, 9, 61))):
        q = torch.randn(shape) * scale  # the last: 3843 elements, products of 64 and a remainder
        qt = q + 0.05 * torch.randn_like(q)
        gate = make_gate(GateSpec("relu"), q, 3.0, hard=False)
        loss = site_gate_terms(GateSpec("relu"), q, qt, 3.0, gate=gate)[0]
        ref = F.binary_cross_entropy_with_logits(3.0 * q.double(), (qt > 0).double())
        assert abs(loss.item() - ref.item()) <= 2 ** -24 * (1 + 4 * (3.0 * q).abs().mean().item())
    q = torch.tensor([0.0, -0.0, float("nan"), 1.0, -1.0])
    _, agree, _ = site_gate_terms(GateSpec("relu"), q, torch.tensor([False, True, True, True, True]), 1.0, loss=False)
    assert agree.item() == 3

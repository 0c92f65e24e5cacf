"""relu2dlgn.soft_maxpool: the soft max-pool gate, its read and the window cross-entropy against the same
computations on pool_windows' unfolded copy of the windows (and cross_entropy with brute-force targets)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relu2dlgn import gates as G
from relu2dlgn import maxpool_gate, soft_maxpool
from relu2dlgn.gates import PoolGeometry, hard_maxpool_gate


def test_window_cross_entropy_equals_cross_entropy_over_unfolded_windows():
    """window_cross_entropy(q, soft gate, window maxima, teacher indices) has the value and gradient of
    cross_entropy over the unfolded windows of beta q, with the targets' kernel offsets found by brute force
    (flat == idx), over geometries with padding, dilation, ceil-mode overhang, 1-3 spatial dimensions and ties."""
    cases = [(2, (2, 3, 9, 10), dict(kernel_size=3, stride=2, padding=1)),
             (2, (1, 2, 8, 7), dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True)),
             (1, (2, 3, 11), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
             (3, (1, 2, 5, 6, 4), dict(kernel_size=2, stride=(1, 2, 2), padding=(1, 0, 1)))]
    beta = 1.5
    for ndim, shape, kw in cases:
        geo = PoolGeometry.make(ndim, **kw)
        q = torch.randn(shape, dtype=torch.float64)
        q[0, 0] = q[0, 0].clamp_min(0.0)  # ties at 0
        q.requires_grad_(True)
        target = hard_maxpool_gate(torch.randn(shape), geo)
        top = G.max_pool_with_indices(q.detach(), geo)[0]
        gate = G.make_gate(G.GateSpec("maxpool", pool=geo), q, beta, hard=False)
        value = soft_maxpool.window_cross_entropy(q, gate, top, target, beta, geo)
        flat = torch.as_tensor(maxpool_gate.window_flat_indices(geo, shape[2:]))
        offsets = (flat.unsqueeze(0).unsqueeze(0) == target.unsqueeze(2)).int().argmax(2)
        windows = G.pool_windows(beta * q, geo, -math.inf).movedim(2, -1)
        ref = F.cross_entropy(windows.reshape(-1, windows.shape[-1]), offsets.reshape(-1))
        assert torch.allclose(value, ref), kw
        assert torch.allclose(torch.autograd.grad(value, q)[0], torch.autograd.grad(ref, q)[0]), kw


SOFT_GEOMETRIES = [(2, (2, 3, 9, 10), dict(kernel_size=3, stride=2, padding=1)),
                   (2, (1, 2, 8, 7), dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True)),
                   (1, (2, 3, 11), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
                   (3, (1, 2, 5, 6, 4), dict(kernel_size=2, stride=(1, 2, 2), padding=(1, 0, 1)))]


def _reference(q, v, geo, beta):
    g = torch.softmax(G.pool_windows(q * beta, geo, -math.inf), 2)
    return g, (G.pool_windows(v, geo, 0.0) * g).sum(2)


@pytest.mark.parametrize("ndim,shape,kw", SOFT_GEOMETRIES)
def test_soft_maxpool_gate_and_read_equal_the_unfolded_windows(ndim, shape, kw):
    """The soft max-pool gate (softmax of beta q over each window) and the value network's read under it equal the
    same computation on pool_windows' unfolded copy, values and gradients (padding, dilation, ceil-mode overhang,
    overlapping windows, 1-3 spatial dimensions): the read of soft_gate's own output, whose gradient goes to q
    directly, also when the gate has other uses too; the read of any other gate tensor; gradcheck in float64,
    the read for either memory layout of the gate."""
    geo = PoolGeometry.make(ndim, **kw)
    q = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for beta in (1.0, 2.5):
        ref_g, ref = _reference(q, v, geo, beta)
        g = soft_maxpool.soft_gate(q, geo, beta)
        for out in (soft_maxpool.soft_select(v, g, geo), soft_maxpool.soft_select(v, g * 1.0, geo)):
            assert torch.allclose(g, ref_g) and torch.allclose(out, ref)
            w = torch.randn_like(out)
            assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(out, (q, v), w),
                                                             torch.autograd.grad(ref, (q, v), w, retain_graph=True)))
        g = soft_maxpool.soft_gate(q, geo, beta)  # read, and used elsewhere: both gradients reach q
        loss = soft_maxpool.soft_select(v, g, geo).square().sum() + g.pow(3).sum()
        ref_loss = ref.square().sum() + ref_g.pow(3).sum()
        assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(loss, (q, v)),
                                                         torch.autograd.grad(ref_loss, (q, v))))
    assert torch.autograd.gradcheck(lambda q: soft_maxpool.soft_gate(q, geo, 1.7), (q,))
    assert torch.autograd.gradcheck(lambda q, v: soft_maxpool.soft_select(v, soft_maxpool.soft_gate(q, geo, 1.7), geo),
                                    (q, v))
    g = soft_maxpool.soft_gate(q, geo)
    for gate in (g.detach(), g.detach().contiguous()):  # soft_gate's offset-major view, and a window-axis-inner gate
        assert torch.autograd.gradcheck(lambda v, g: soft_maxpool.soft_select(v, g, geo), (v, gate.requires_grad_()))


def test_soft_select_output_may_change_in_place():
    """The read of soft_gate's output keeps what its backward needs: changing its result in place afterwards (an
    in-place ReLU after the pool) leaves the gradients those of the same computation on unfolded windows."""
    geo = PoolGeometry.make(2, kernel_size=3, stride=2, padding=1)
    q = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    out = torch.relu_(soft_maxpool.soft_select(v, soft_maxpool.soft_gate(q, geo, 2.0), geo))
    ref = torch.relu_(_reference(q, v, geo, 2.0)[1])
    w = torch.randn_like(out)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(out, (q, v), w),
                                                     torch.autograd.grad(ref, (q, v), w)))


def test_soft_gate_beta():
    """beta must be positive; a tensor beta (make_gate's, for torch.compile or a learnt one) gets its gradient."""
    geo = PoolGeometry.make(2, kernel_size=2, stride=2)
    q = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta must be positive"):
            soft_maxpool.soft_gate(q, geo, beta)
    beta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    g = G.make_gate(G.GateSpec("maxpool", pool=geo), q, beta, hard=False)
    ref = torch.softmax(G.pool_windows(q * beta, geo, -math.inf), 2)
    w = torch.randn_like(g)
    assert torch.allclose(g, ref)
    assert torch.allclose(torch.autograd.grad(g, beta, w)[0], torch.autograd.grad(ref, beta, w)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_soft_gate_in_place(dtype):
    """soft_gate takes the CPU soft-max in place over its window buffer (torch._softmax with out= its input), which
    holds because the kernel reads a position's inputs along the soft-max axis before it writes them: equal, bit for
    bit, to the out-of-place soft-max, for an axis that is not the last, at a size the kernel splits between
    threads, with one thread and with two."""
    x = torch.randn(9, 4, 64, 33, 17).mul_(8).to(dtype)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ref = torch.softmax(x, 0)
            buf = x.clone()
            assert torch.equal(torch._softmax(buf, 0, False, out=buf), ref) and torch.equal(buf, ref)
    finally:
        torch.set_num_threads(threads)

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


@pytest.mark.parametrize("ndim,shape,kw", SOFT_GEOMETRIES)
def test_soft_maxpool_gate_and_read_equal_the_unfolded_windows(ndim, shape, kw):
    """The soft max-pool gate (softmax over each window) and the value network's read under it equal the same
    computation on pool_windows' unfolded copy, values and gradients (padding, dilation, ceil-mode overhang,
    overlapping windows, 1-3 spatial dimensions); gradcheck in float64, the read for either memory layout of the
    gate."""
    geo = PoolGeometry.make(ndim, **kw)
    z = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = soft_maxpool.soft_gate(z, geo)
    ref_g = torch.softmax(G.pool_windows(z, geo, -math.inf), 2)
    out = soft_maxpool.soft_select(v, g, geo)
    ref = (G.pool_windows(v, geo, 0.0) * ref_g).sum(2)
    assert torch.allclose(g, ref_g) and torch.allclose(out, ref)
    w = torch.randn_like(out)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(out, (z, v), w),
                                                     torch.autograd.grad(ref, (z, v), w)))
    assert torch.autograd.gradcheck(lambda z: soft_maxpool.soft_gate(z, geo), (z,))
    for gate in (g.detach(), g.detach().contiguous()):  # soft_gate's offset-major view, and a window-axis-inner gate
        assert torch.autograd.gradcheck(lambda v, g: soft_maxpool.soft_select(v, g, geo), (v, gate.requires_grad_()))

"""Gate statistics on a hand-built model whose firing rates, pieces and arg-max offsets are known by construction;
streaming gives the same numbers whatever the batch size; bad loaders get clear errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import relu2dlgn
from relu2dlgn import explain
from relu2dlgn.errors import InputError


class Known(nn.Module):
    """Sites read the input directly: relu on channels 0-2, hardtanh(-1, 1) on 3-4, 2x2 max-pool on 5-6."""

    def forward(self, x):
        a = F.relu(x[:, 0:3])
        b = F.hardtanh(x[:, 3:5], -1.0, 1.0)
        c = F.max_pool2d(x[:, 5:7], 2)
        return torch.cat([a.mean((2, 3)), b.mean((2, 3)), c.mean((2, 3))], 1)


def known_inputs() -> torch.Tensor:
    x = torch.zeros(4, 7, 2, 4)
    x[:, 0] = 1.0                       # always on
    x[:, 1] = -1.0                      # dead
    x[:2, 2], x[2:, 2] = 1.0, -1.0      # on half of the time
    x[0, 3], x[1:3, 3], x[3, 3] = -2.0, 0.5, 2.0   # below, linear, linear, above
    x[:, 4] = 0.5                       # always linear
    x[:, 5, 0, 0::2] = 5.0              # the window's top-left element is the maximum: offset 0 always
    for n in range(4):
        for w in range(2):              # offset k = (2n + w) % 4 for channel 6's window w of example n
            k = (2 * n + w) % 4
            x[n, 6, k // 2, 2 * w + k % 2] = 5.0
    return x


def test_known_rates_pieces_and_windows():
    x = known_inputs()
    dlgn = relu2dlgn.convert(Known(), example_inputs=x[:2]).eval()
    stats = explain.gate_stats(dlgn, DataLoader(TensorDataset(x, torch.zeros(4)), batch_size=3))
    relu, htanh, pool = stats.sites
    assert stats.examples == 4
    assert relu.unit_rates.tolist() == [1.0, 0.0, 0.5]
    assert (relu.on_fraction, relu.dead, relu.always_on, relu.units) == (0.5, 1, 1, 3)
    assert relu.entropy == pytest.approx(1 / 3)
    assert htanh.unit_rates.tolist() == [0.5, 1.0]
    assert htanh.pieces == {"below": 1 / 8, "linear": 6 / 8, "above": 1 / 8}
    assert (htanh.dead, htanh.always_on) == (0, 1) and htanh.entropy == pytest.approx(0.5)
    assert pool.window.tolist() == [10, 2, 2, 2] and pool.on_fraction is None
    p = torch.tensor([10, 2, 2, 2]) / 16
    assert pool.evenness == pytest.approx(float(-(p * p.log()).sum()) / math.log(4))
    assert stats.on_fraction == pytest.approx((0.5 * 24 + 0.75 * 16) / 40)  # element-weighted over sites 0, 1
    assert (stats.dead, stats.always_on, stats.units) == (1, 2, 5)
    one = explain.gate_stats(dlgn, DataLoader(TensorDataset(x), batch_size=1))
    assert one.as_dict() == stats.as_dict()
    assert explain.gate_stats(dlgn, [x, x], max_batches=1).as_dict() == stats.as_dict()


def test_bad_loaders():
    x = known_inputs()
    dlgn = relu2dlgn.convert(Known(), example_inputs=x[:2])
    with pytest.raises(InputError, match="batch 1 of the loader does not fit the model: .*rank 4"):
        explain.gate_stats(dlgn, [x, x[0]])
    with pytest.raises(InputError, match="batch 0 of the loader is a str"):
        explain.gate_stats(dlgn, ["not a batch"])
    with pytest.raises(InputError, match="no examples"):
        explain.gate_stats(dlgn, [])


def test_loader_with_the_wrong_channel_count():
    from _models import TinyNet
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match=r"batch 0 of the loader of shape \(2, 1, 8, 8\) does not fit the model "
                                         r"\(converted with an example input of shape \(2, 3, 8, 8\)\)"):
        explain.gate_stats(dlgn, [torch.randn(2, 1, 8, 8)])
    with pytest.raises(InputError, match="npk: the inputs of shape"):
        explain.npk(dlgn, torch.randn(2, 1, 8, 8))

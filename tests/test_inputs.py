"""Input checks of a converted model (issue 10, item 12): integer, uint8 and bool inputs to a model that needs
floating point raise InputError naming the input and the layer, not torch's error from deep inside; a model
that takes integer inputs (token ids) still takes them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn
from _models import TinyNet
from relu2dlgn.errors import InputError


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("mode", ["dlgn", "dgn"])
def test_integer_and_bool_inputs_are_input_errors(dtype, mode):
    dlgn = relu2dlgn.convert(TinyNet().eval(), mode=mode)
    x = torch.zeros(2, 3, 8, 8, dtype=dtype)
    pattern = rf"input 0 \('x'\) has dtype {dtype}.*conv1.*floating point.*torch\.float32"
    for model in (dlgn.eval(), dlgn.train()):
        with pytest.raises(InputError, match=pattern):
            model(x)
    with pytest.raises(InputError, match=pattern):
        dlgn.gates(x)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(F.relu(self.emb(ids))).mean(1)


def test_a_model_that_takes_integer_inputs_still_takes_them():
    model = Tokens().eval()
    dlgn = relu2dlgn.convert(model, mode="dgn").eval()
    ids = torch.randint(0, 20, (2, 5))
    assert torch.allclose(dlgn(ids), model(ids))

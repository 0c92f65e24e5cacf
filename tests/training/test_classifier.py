"""train_classifier: the same training loop for a plain network (the source before conversion)."""
from __future__ import annotations

import shutil

import pytest
import torch

import relu2dlgn
from _models import TinyNet, source_net
from helpers import FAST, comparable
from relu2dlgn.data import make_loader
from relu2dlgn.training import checkpoint, train_classifier
from relu2dlgn.zoo import load_weights


def test_trains_saves_and_resumes_a_plain_network(digits, tmp_path):
    train, val = digits
    torch.manual_seed(0)
    model = TinyNet(num_classes=10)
    res = train_classifier(model, make_loader(train, 16, train=True), make_loader(val, 64, train=False), epochs=3,
                           lr=1e-2, out_dir=str(tmp_path / "a"), **FAST)
    first, last = res.history[0], res.history[-1]
    assert last["val_loss"] < first["val_loss"] - 0.1 and last["val_acc"] > first["val_acc"] + 0.1   # it learns
    assert "beta" not in res.final and "lr_model" in res.final and "val_gate_agreement" not in res.final
    again = TinyNet(num_classes=10)
    load_weights(again, str(tmp_path / "a" / "model" / "model.safetensors"))
    x = torch.stack([val[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    # resume from epoch 2's checkpoint reproduces epoch 3
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "epoch-0003")
    (tmp_path / "b" / "checkpoints" / "latest.json").write_text('{"dir": "epoch-0002", "epoch": 2}')
    torch.manual_seed(0)
    resumed = TinyNet(num_classes=10)
    res2 = train_classifier(resumed, make_loader(train, 16, train=True), make_loader(val, 64, train=False), epochs=3,
                            lr=1e-2, out_dir=str(tmp_path / "b"), resume=True, **FAST)
    assert comparable(res2.history) == comparable(res.history)
    assert checkpoint.latest_checkpoint(str(tmp_path / "b")).endswith("epoch-0003")


def test_gate_options_and_teachers_are_refused_for_a_plain_network(digits):
    train, _ = digits
    loader = make_loader(train, 32, train=True)
    with pytest.raises(relu2dlgn.OptionError, match="freeze_gating=True: TinyNet has no gating network"):
        train_classifier(TinyNet(), loader, freeze_gating=True, **FAST)
    with pytest.raises(relu2dlgn.InputError, match="for a DLGN use relu2dlgn.finetune"):
        train_classifier(relu2dlgn.convert(source_net()), loader, **FAST)
    with pytest.raises(relu2dlgn.InputError, match="relu2dlgn.training.train_classifier"):
        relu2dlgn.finetune(TinyNet(), loader, **FAST)

"""relu2dlgn.training.Trainer / finetune: training, distillation, frozen networks, batch norm, options."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import relu2dlgn
from _models import TinyNet
from _models import source_net
from helpers import FAST, state
from relu2dlgn.data import make_loader
from relu2dlgn.training import finetune, fresh_dlgn, recalibrate_bn


def test_training_reduces_loss(digits):
    train, _ = digits
    x, y = next(iter(DataLoader(train, batch_size=64)))
    dlgn = relu2dlgn.convert(source_net())
    dlgn.train()
    with torch.no_grad():
        before = F.cross_entropy(dlgn(x), y).item()
    finetune(dlgn, [(x, y)] * 20, epochs=1, lr=3e-2, warmup_fraction=0.0, recalibrate_bn=0, **FAST)
    dlgn.train()
    with torch.no_grad():
        after = F.cross_entropy(dlgn(x), y).item()
    assert after < 0.8 * before


def test_distillation_trains_and_reports_agreement(digits, tmp_path):
    train, val = digits
    model = source_net()
    dlgn = relu2dlgn.convert(model)
    result = finetune(dlgn, make_loader(train, 32, train=True), make_loader(val, 64, train=False), teacher=model,
                      epochs=2, out_dir=str(tmp_path), **FAST)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1, 2] and lines == result.history
    last = lines[-1]
    for key in ("train_loss", "train_ce", "train_kd", "train_gate_loss", "train_acc", "train_gate_agreement",
                "val_loss", "val_acc", "val_gate_agreement", "lr_gating", "lr_value", "beta", "throughput"):
        assert isinstance(last[key], float) and math.isfinite(last[key]), key
    assert len(last["val_gate_agreement_per_site"]) == len(dlgn.sites)
    assert last["beta"] == pytest.approx(30.0)  # 10 -> 3x, geometric
    assert "val_acc" in result.summary and dlgn.training is False
    loaded = relu2dlgn.load(tmp_path / "model")
    x = torch.stack([val[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), dlgn(x), atol=1e-5)


def test_teacher_without_distillation_only_reports_agreement(digits):
    train, val = digits
    model = source_net()
    dlgn = relu2dlgn.convert(model)
    r = finetune(dlgn, make_loader(train, 32, train=True), make_loader(val, 64, train=False), teacher=model,
                 distill=False, epochs=1, **FAST)
    last = r.final
    assert 0 < last["val_gate_agreement"] <= 1
    assert not {"train_kd", "train_gate_loss", "train_gate_agreement"} & set(last)


@pytest.mark.parametrize("frozen", ["gating", "value"])
def test_frozen_network_keeps_its_weights(digits, frozen):
    train, _ = digits
    model = source_net()
    dlgn = relu2dlgn.convert(model)
    before = state(dlgn)
    finetune(dlgn, make_loader(train, 32, train=True), teacher=model, epochs=1, lr=1e-2,
             **{f"freeze_{frozen}": True}, **FAST)
    after = state(dlgn)
    other = "value" if frozen == "gating" else "gating"
    for k in before:
        if k.startswith(frozen + "."):  # weights and batch-norm statistics
            assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k.startswith(other + ".") and before[k].is_floating_point()
               and not torch.equal(before[k], after[k])]
    assert changed
    with pytest.raises(ValueError, match="cannot freeze both"):
        finetune(dlgn, [], freeze_gating=True, freeze_value=True, **FAST)


def test_value_input_ones_and_from_scratch(digits):
    train, val = digits
    dlgn = relu2dlgn.convert(source_net(), value_input="ones")
    r = finetune(dlgn, make_loader(train, 32, train=True), make_loader(val, 64, train=False), epochs=1, **FAST)
    assert math.isfinite(r.final["val_loss"])
    scratch = fresh_dlgn(lambda: TinyNet(num_classes=10), seed=3)
    sd = scratch.state_dict()
    assert not torch.equal(sd["gating.conv1.weight"], sd["value.conv1.weight"])
    again = fresh_dlgn(lambda: TinyNet(num_classes=10), seed=3)
    assert torch.equal(again.state_dict()["value.conv1.weight"], sd["value.conv1.weight"])


def test_recalibrate_bn_uses_hard_gates_and_keeps_weights(digits):
    train, _ = digits
    dlgn = relu2dlgn.convert(source_net())
    weights = {k: v for k, v in state(dlgn).items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_bn(dlgn, make_loader(train, 32, train=False), 3) == 3
    after = state(dlgn)
    assert all(torch.equal(v, after[k]) for k, v in weights.items())
    assert not torch.equal(after["gating.bn2.running_mean"], state(relu2dlgn.convert(source_net()))["gating.bn2.running_mean"])
    assert dlgn.training is False and dlgn.gating.bn1.momentum == 0.1


def test_bad_options_are_named(digits):
    dlgn = relu2dlgn.convert(source_net())
    with pytest.raises(TypeError, match="unknown option.*lrate.*valid options"):
        finetune(dlgn, [], lrate=1.0)
    with pytest.raises(ValueError, match="lr=-1"):
        finetune(dlgn, [], lr=-1)
    with pytest.raises(ValueError, match="distill=True needs a teacher"):
        finetune(dlgn, [(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))], distill=True, **FAST)
    with pytest.raises(relu2dlgn.InputError, match="rank 4"):
        finetune(dlgn, [(torch.zeros(2, 16, 16), torch.zeros(2, dtype=torch.long))], **FAST)
    with pytest.raises(relu2dlgn.InputError, match="class indices"):
        finetune(dlgn, [(torch.zeros(2, 3, 16, 16), torch.zeros(2))], **FAST)
    with pytest.raises(relu2dlgn.InputError, match="relu2dlgn.DLGN"):
        finetune(source_net(), [], **FAST)

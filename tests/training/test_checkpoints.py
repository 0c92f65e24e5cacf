"""Checkpoints: a resumed run equals an uninterrupted one, the NaN guard keeps the last good checkpoint."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import relu2dlgn
from _models import source_net
from helpers import FAST, comparable
from relu2dlgn.data import make_loader
from relu2dlgn.training import FinetuneConfig, NonFiniteLossError, Trainer, finetune, latest_checkpoint


class Crash(Exception):
    pass


class CrashingLoader:
    """Wraps a loader; raises Crash at batch ``at`` of its ``iteration``-th pass, like a killed job. The first
    pass is the batch-norm recalibration before epoch 1, so pass ``k + 1`` is epoch ``k``."""

    def __init__(self, loader, iteration, at):
        self.loader, self.epoch, self.at, self.epochs = loader, iteration, at, 0
        self.sampler = loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epochs += 1
        for i, batch in enumerate(self.loader):
            if self.epochs == self.epoch and i == self.at:
                raise Crash()
            yield batch



def test_resume_equals_uninterrupted(digits, tmp_path):
    train, val = digits  # shuffled, augmented: the data order and augmentation RNG must be restored too
    model = source_net()
    opts = dict(epochs=3, keep_checkpoints=1, **FAST)

    def loaders():
        return make_loader(train, 32, train=True), make_loader(val, 64, train=False)

    ref = relu2dlgn.convert(model)
    full = finetune(ref, *loaders(), teacher=model, out_dir=str(tmp_path / "a"), **opts)

    run = relu2dlgn.convert(model)
    tl, vl = loaders()
    with pytest.raises(Crash):
        finetune(run, CrashingLoader(tl, iteration=4, at=2), vl, teacher=model, out_dir=str(tmp_path / "b"), **opts)
    assert latest_checkpoint(str(tmp_path / "b")).endswith("epoch-0002")
    torch.manual_seed(1234)  # whatever the process did in between must not matter
    resumed = relu2dlgn.convert(model)
    res = finetune(resumed, *loaders(), teacher=model, out_dir=str(tmp_path / "b"), resume=True, **opts)

    assert comparable(res.history) == comparable(full.history)
    a, b = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert comparable(metrics) == comparable(full.history)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["epoch-0003", "latest.json"]


class PoisonedLoader(CrashingLoader):
    """Batch ``at`` of pass ``iteration`` has a NaN pixel."""

    def __iter__(self):
        self.epochs += 1
        for i, (x, y) in enumerate(self.loader):
            if self.epochs == self.epoch and i == self.at:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y


def _digest(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def test_nan_loss_stops_with_last_checkpoint_intact(digits, tmp_path):
    train, val = digits
    dlgn = relu2dlgn.convert(source_net())
    loader = PoisonedLoader(make_loader(train, 32, train=True), iteration=3, at=3)  # epoch 2
    out = str(tmp_path)
    digest = {}

    class Spy(Trainer):  # records the checkpoint as it was when written
        def save_checkpoint(self):
            path = super().save_checkpoint()
            digest[self.epoch] = _digest(path)
            return path

    trainer = Spy(dlgn, loader, make_loader(val, 64, train=False),
                  config=FinetuneConfig.from_options(epochs=3, out_dir=out, **FAST))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2, batch 4/6.*epoch-0001"):
        trainer.fit()
    ckpt = latest_checkpoint(out)
    assert ckpt.endswith("epoch-0001") and _digest(ckpt) == digest[1]
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1]
    assert not os.path.exists(tmp_path / "model")
    # the checkpoint is usable: resuming (with clean data) finishes the run
    clean = relu2dlgn.convert(source_net())
    res = finetune(clean, make_loader(train, 32, train=True), make_loader(val, 64, train=False), epochs=3,
                   out_dir=out, resume=True, **FAST)
    assert [r["epoch"] for r in res.history] == [0, 1, 2, 3]
    assert all(torch.isfinite(p).all() for p in clean.parameters())


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(relu2dlgn.Relu2DlgnError, match="no checkpoint under"):
        finetune(relu2dlgn.convert(source_net()), [(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))],
                 out_dir=str(tmp_path), resume=True, **FAST)

"""Faults: interrupted checkpoint writes, a killed run resumed, full disks when saving and exporting."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import relu2dlgn
from relu2dlgn.training import checkpoint as T
from _models import TinyNet, randomize_bn

FAST = {"progress": False, "recalibrate_bn": 0}


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 12, 12, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)), \
        DataLoader(ds, batch_size=48)


def _dlgn():
    torch.manual_seed(0)
    return relu2dlgn.convert(randomize_bn(TinyNet()).eval(), mode="dlgn")


def _comparable(history):
    return [{k: v for k, v in r.items() if k not in ("time", "throughput", "epoch_time")} for r in history]


def test_checkpoint_write_interrupted_midway_leaves_previous_loadable(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    ref = relu2dlgn.finetune(_dlgn(), *_loaders(), epochs=3, out_dir=str(tmp_path / "ref"), **FAST)

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:                       # the epoch-2 trainer state: half a file, then the process dies
            with open(f, "wb") as fh:
                fh.write(b"\x80\x04partial")
            raise KeyboardInterrupt("killed while writing the checkpoint")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(T.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        relu2dlgn.finetune(_dlgn(), *_loaders(), epochs=3, out_dir=out, **FAST)
    monkeypatch.setattr(T.torch, "save", real_save)

    latest = T.latest_checkpoint(out)
    assert latest.endswith("epoch-0001")                       # still the previous, complete one
    weights, state = T.load_checkpoint(latest)
    assert state["epoch"] == 1 and set(weights) == set(_dlgn().state_dict())
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if ".tmp-" in d]

    # a SIGKILL leaves the temporary directory behind: resume must ignore it
    os.makedirs(os.path.join(out, "checkpoints", "epoch-0002.tmp-dead"))
    resumed = relu2dlgn.finetune(_dlgn(), *_loaders(), epochs=3, out_dir=out, resume=True, **FAST)
    assert _comparable(resumed.history) == _comparable(ref.history)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_save_on_a_full_disk_writes_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        _dlgn().save(tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_save_on_a_full_disk_keeps_the_previous_save(tmp_path, monkeypatch):
    d = _dlgn().eval()
    d.save(tmp_path / "m")
    monkeypatch.setattr(torch, "save", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        d.save(tmp_path / "m")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m"]
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(relu2dlgn.load(tmp_path / "m")(x), d(x))


def test_export_on_a_full_disk_writes_nothing(tmp_path, monkeypatch):
    from relu2dlgn.export import files
    monkeypatch.setattr(files, "save", _full_disk)
    d = _dlgn().eval()
    with pytest.raises((relu2dlgn.ExportError, OSError), match="No space left"):
        relu2dlgn.export_onnx(d, str(tmp_path / "m.onnx"), example_inputs=(torch.randn(2, 3, 8, 8),))
    assert os.listdir(tmp_path) == []

"""DDP: 2 gloo processes == one process with the same global batch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import relu2dlgn
from helpers import FAST, comparable, rel_err
from relu2dlgn.training import finetune, latest_checkpoint


class NoBN(nn.Module):
    """No batch norm: under DDP each process would normalise its own half-batch (see the DDP test)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


def _ddp_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 8, 8, generator=g)
    return TensorDataset(x, torch.randint(0, 4, (48,), generator=g))


def _ddp_run(batch_size, out_dir):
    torch.manual_seed(0)
    model = NoBN().eval()
    dlgn = relu2dlgn.convert(model)
    ds = _ddp_data()
    res = finetune(dlgn, DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=batch_size),
                   teacher=model, epochs=2, lr=3e-3, out_dir=out_dir, **FAST)
    return dlgn, res


def _ddp_worker(rank, world, rendezvous, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        dlgn, res = _ddp_run(12 // world, out_dir)  # per-process batch: global batch 12
        torch.save({"state": dlgn.state_dict(), "history": comparable(res.history)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """The DLGN has no batch norm on purpose: with DDP every process normalises its own half of the batch,
    which is not the full-batch statistic a single process uses (SyncBatchNorm would make them agree)."""
    import torch.multiprocessing as mp
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(ddp_dir)), nprocs=2, join=True)
    r0, r1 = (torch.load(ddp_dir / f"rank{r}.pt") for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["history"] == r1["history"]

    single, res = _ddp_run(12, str(tmp_path / "single"))
    for k, v in single.state_dict().items():
        assert rel_err(r0["state"][k], v) < 1e-4, k
    for a, b in zip(r0["history"], comparable(res.history)):
        for key in ("train_loss", "train_kd", "train_gate_loss", "val_loss", "val_acc", "val_gate_agreement"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert (ddp_dir / "metrics.jsonl").exists() and latest_checkpoint(str(ddp_dir)).endswith("epoch-0002")

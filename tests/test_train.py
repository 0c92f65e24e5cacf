"""relu2dlgn.train: the training step, frozen networks, distillation terms, resume, NaN guard, DDP, CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import relu2dlgn
from _models import TinyNet, randomize_bn, rel_err
from relu2dlgn.data import load_data, make_loader
from relu2dlgn.gates import GateSpec, PoolGeometry, pool_windows
from relu2dlgn.train import (FinetuneConfig, NonFiniteLossError, TeacherTap, Trainer, add_finetune_parser,
                             beta_at, finetune, fresh_dlgn, kd_loss, latest_checkpoint, lr_factor, match_sites,
                             recalibrate_bn, site_gate_terms)

FAST = {"progress": False, "verbose": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, and on a busy machine
    spinning OpenMP threads slow them down by an order of magnitude."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """A small slice of the real digits at 16x16: 192 training and 64 validation images."""
    data = load_data("digits", image_size=16)
    return Subset(data.train, range(192)), Subset(data.val, range(64))


def source_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(num_classes=10), seed).eval()


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# pieces: teacher tap, site matching, losses, schedules
# ---------------------------------------------------------------------------------------------------

def test_teacher_tap_is_source_output_and_preactivations():
    model = source_net()
    x = torch.randn(3, 3, 16, 16)
    tap = TeacherTap(model)
    dgn = relu2dlgn.convert(model, mode="dgn").eval()
    with torch.no_grad():
        out, qs = tap(x)
        ref_qs = dgn.pre_activations(x)
        ref = model(x)
    assert torch.equal(out, ref)
    assert len(qs) == len(ref_qs) == 3  # relu, maxpool, relu (the in-place ReLU module called twice)
    for a, b in zip(qs, ref_qs):
        assert torch.equal(a, b)
    assert (qs[0] < 0).any()  # a clone before the in-place ReLU, not its output
    assert tap.site_nodes == [s.node for s in dgn.sites]
    assert model.training is False and all(not p.requires_grad or True for p in tap.parameters())


def test_teacher_tap_leaves_the_batch_alone():
    class InPlaceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x.relu_()  # mutates the caller's batch
            return self.conv(x).relu().mean((2, 3))

    x = torch.randn(2, 3, 8, 8)
    keep = x.clone()
    tap = TeacherTap(InPlaceFirst().eval())
    assert tap.mutates_input and not TeacherTap(source_net()).mutates_input
    out, qs = tap(x)
    assert torch.equal(x, keep) and len(qs) == 2


def test_match_sites_by_name_and_clear_error():
    model = source_net()
    dlgn_avg = relu2dlgn.convert(model, pool="avg")  # no max-pool site
    tap = TeacherTap(model)
    assert match_sites(dlgn_avg, tap.site_nodes, tap.site_kinds) == [(0, 0), (1, 2)]

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.relu(self.conv(x)).mean((2, 3))

    other = TeacherTap(Other())
    with pytest.raises(relu2dlgn.InputError, match=r"teacher's gate sites do not match.*site 1 \(relu 'relu_1'"):
        match_sites(dlgn_avg, other.site_nodes, other.site_kinds)


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


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# checkpoints: resume == uninterrupted, NaN guard
# ---------------------------------------------------------------------------------------------------

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


def _comparable(history):
    drop = {"time", "throughput", "epoch_time"}
    return [{k: v for k, v in r.items() if k not in drop} for r in history]


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

    assert _comparable(res.history) == _comparable(full.history)
    a, b = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert _comparable(metrics) == _comparable(full.history)
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
                  config=FinetuneConfig(epochs=3, out_dir=out, **FAST))
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


# ---------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes == one process with the same global batch
# ---------------------------------------------------------------------------------------------------

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
        torch.save({"state": dlgn.state_dict(), "history": _comparable(res.history)},
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
    for a, b in zip(r0["history"], _comparable(res.history)):
        for key in ("train_loss", "train_kd", "train_gate_loss", "val_loss", "val_acc", "val_gate_agreement"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert (ddp_dir / "metrics.jsonl").exists() and latest_checkpoint(str(ddp_dir)).endswith("epoch-0002")


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------

def _cli(argv):
    parser = argparse.ArgumentParser(prog="relu2dlgn")
    add_finetune_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_finetune_digits_distill_resume(tmp_path):
    from safetensors.torch import save_file
    ckpt = tmp_path / "src.safetensors"
    save_file(source_net().state_dict(), str(ckpt))
    out = tmp_path / "run"
    common = ["finetune", "_models:TinyNet", "--checkpoint", str(ckpt), "--data", "digits", "--image-size", "12",
              "--batch-size", "256", "--out", str(out), "--no-progress"]
    assert _cli(common + ["--epochs", "1", "--distill"]) == 0
    assert _cli(common + ["--epochs", "2", "--distill", "--resume"]) == 0
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1, 2] and "val_gate_agreement" in lines[-1]
    dlgn = relu2dlgn.load(out / "model")
    assert dlgn.mode == "dlgn" and len(dlgn.sites) == 3
    scratch = tmp_path / "scratch"
    assert _cli(["finetune", "_models:TinyNet", "--data", "digits", "--image-size", "12", "--channels", "1",
                 "--batch-size", "256",
                 "--epochs", "1", "--from-scratch", "--freeze-gating", "--value-input", "ones", "--pool", "avg",
                 "--out", str(scratch), "--no-progress"]) == 0
    assert relu2dlgn.load(scratch / "model").value_input == "ones"
    with pytest.raises(relu2dlgn.InputError, match="--distill needs --checkpoint"):
        _cli(["finetune", "_models:TinyNet", "--data", "digits", "--distill", "--out", str(scratch)])

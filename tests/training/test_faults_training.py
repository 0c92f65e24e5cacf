"""Fine-tuning under faults and bad input (issue 10): nothing poisoned, nothing lost, every error ours.

Each test is named after the defect it pins: a non-finite state never reaches a checkpoint or ``model/``, a
non-finite batch leaves the in-memory model as it was, a damaged or mismatched checkpoint is a ``LoadError``
naming the file, labels and loaders are checked up front, the logits are chosen explicitly, and the teacher
is traced and run as the DLGN was converted and left exactly as it was given.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import relu2dlgn
from _models import TinyNet, randomize_bn
from helpers import FAST, run_cli
from relu2dlgn.errors import InputError, LoadError, NonFiniteLossError, OptionError
from relu2dlgn.training import Trainer, finetune, latest_checkpoint, save_checkpoint
from relu2dlgn.training.checkpoint import checkpoint_dirs

QUICK = {**FAST, "recalibrate_bn": 0}


def _data(n: int = 48, size: int = 12, labels: torch.dtype = torch.long, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g).to(labels))


def _loaders(labels: torch.dtype = torch.long) -> tuple[DataLoader, DataLoader]:
    return DataLoader(_data(labels=labels), batch_size=16), DataLoader(_data(32, seed=1, labels=labels), batch_size=32)


def _source(seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(num_classes=num_classes), seed).eval()


def _dlgn(**kw) -> relu2dlgn.DLGN:
    return relu2dlgn.convert(_source(**kw))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


class Tap:
    """Wraps a loader; calls ``at_batch(model)`` before yielding batch ``at`` of pass ``epoch`` (pass 1 is epoch 1:
    these runs do not re-estimate batch norm), and may replace that batch."""

    def __init__(self, loader, epoch: int, at: int, hook):
        self.loader, self.epoch, self.at, self.hook, self.passes = loader, epoch, at, hook, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.loader):
            if self.passes == self.epoch and i == self.at:
                batch = self.hook(batch) or batch
            yield batch


def _first_bn(net: nn.Module) -> nn.BatchNorm2d:
    return next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))


# -- 1. a non-finite state never reaches a checkpoint or model/ -------------------------------------------------

def test_inf_in_batchnorm_running_mean_fails_loudly_and_keeps_the_last_good_checkpoint(tmp_path):
    """Item 1: an inf written into a running mean mid-epoch (the loss stays finite: training uses batch
    statistics) is caught at the end of the epoch, before validation and the checkpoint; the newest good
    checkpoint survives rotation (keep_checkpoints=1), no model/ is written, and the in-memory model is put back
    to the last good state."""
    dlgn = _dlgn()
    train, val = _loaders()

    def corrupt(batch):
        with torch.no_grad():
            _first_bn(dlgn.value).running_mean[0] = float("inf")

    out = str(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"(?s)after epoch 2.*value\.bn1\.running_mean.*epoch-0001"):
        finetune(dlgn, Tap(train, epoch=2, at=1, hook=corrupt), val, epochs=3, out_dir=out, keep_checkpoints=1,
                 **QUICK)
    assert checkpoint_dirs(out) == ["epoch-0001"] and latest_checkpoint(out).endswith("epoch-0001")
    assert not os.path.exists(tmp_path / "model")
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1]
    assert _finite(dlgn)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(latest_checkpoint(out), "model.safetensors"))
    assert _equal(_state(dlgn), saved)                       # the in-memory model is the last good one


def test_a_checkpoint_with_non_finite_weights_is_refused_and_the_good_ones_stay(tmp_path):
    """Item 1: save_checkpoint itself never writes (nor rotates for) a non-finite state."""
    out = str(tmp_path)
    weights = {"w": torch.ones(3), "n": torch.zeros((), dtype=torch.long)}
    save_checkpoint(out, 1, weights, {"epoch": 1, "step": 1, "optimizer": {}}, keep=1)
    bad = {"w": torch.tensor([1.0, float("nan"), 1.0]), "n": torch.zeros((), dtype=torch.long)}
    with pytest.raises(NonFiniteLossError, match=r"epoch-0002.*\bw\b.*epoch-0001"):
        save_checkpoint(out, 2, bad, {"epoch": 2, "step": 2, "optimizer": {}}, keep=1)
    assert checkpoint_dirs(out) == ["epoch-0001"] and latest_checkpoint(out).endswith("epoch-0001")


# -- 2. a non-finite batch leaves the in-memory model as it was -------------------------------------------------

class _PoisonAndRecord:
    def __init__(self, dlgn):
        self.dlgn, self.before = dlgn, None

    def __call__(self, batch):
        x, y = batch
        self.before = _state(self.dlgn)
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
        return x, y


def test_nan_batch_restores_the_batchnorm_statistics_it_poisoned():
    """Item 2: the forward of a NaN batch updates the running statistics before the loss is known to be NaN;
    the error restores them, so the in-memory DLGN is exactly as before the batch, and says so."""
    dlgn = _dlgn()
    train, val = _loaders()
    poison = _PoisonAndRecord(dlgn)
    with pytest.raises(NonFiniteLossError, match=r"(?s)epoch 1, batch 2/3.*batch-norm statistics.*restored"):
        finetune(dlgn, Tap(train, epoch=1, at=1, hook=poison), val, epochs=2, **QUICK)
    assert _finite(dlgn)
    assert _equal(_state(dlgn), poison.before)


# -- 3. damaged or mismatched checkpoints are LoadErrors naming the file ---------------------------------------

@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    finetune(_dlgn(), *_loaders(), epochs=1, out_dir=str(out), **QUICK)
    return out


def _damaged_copy(run, tmp_path, damage):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run, out)
    ckpt = out / "checkpoints" / "epoch-0001"
    damage(out, ckpt)
    return str(out)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGE = {
    "garbage trainer state": (lambda out, c: (c / "trainer.pt").write_bytes(b"\x80\x05garbage"), r"trainer\.pt"),
    "truncated trainer state": (lambda out, c: _truncate(c / "trainer.pt"), r"trainer\.pt"),
    "empty trainer state": (lambda out, c: (c / "trainer.pt").write_bytes(b""), r"trainer\.pt"),
    "missing trainer state": (lambda out, c: os.remove(c / "trainer.pt"), r"trainer\.pt"),
    "garbage weights": (lambda out, c: (c / "model.safetensors").write_bytes(b"garbage" * 10), r"model\.safetensors"),
    "truncated weights": (lambda out, c: _truncate(c / "model.safetensors", 0.9), r"model\.safetensors"),
    "garbage pointer": (lambda out, c: (out / "checkpoints" / "latest.json").write_text("{"), r"latest\.json"),
    "dangling pointer": (lambda out, c: os.rename(c, out / "checkpoints" / "gone"), r"latest\.json"),
    "not a trainer state": (lambda out, c: torch.save([1, 2], c / "trainer.pt"), r"trainer\.pt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_a_load_error_naming_the_file(one_epoch_run, tmp_path, damage):
    """Item 3: unpickling errors, EOFError, SafetensorError, a bad pointer: LoadError naming the file."""
    fn, where = DAMAGE[damage]
    out = _damaged_copy(one_epoch_run, tmp_path, fn)
    with pytest.raises(LoadError, match=where):
        finetune(_dlgn(), *_loaders(), epochs=2, out_dir=out, resume=True, **QUICK)


def test_resume_from_a_checkpoint_of_another_architecture_is_a_load_error(one_epoch_run, tmp_path):
    """Item 3: a 10-class checkpoint resumed into a 3-class DLGN: LoadError naming the file and the tensors, not
    load_state_dict's size-mismatch RuntimeError."""
    out = _damaged_copy(one_epoch_run, tmp_path, lambda out, c: None)
    y3 = lambda ds: TensorDataset(ds.tensors[0], ds.tensors[1] % 3)  # noqa: E731
    loaders = DataLoader(y3(_data()), batch_size=16), DataLoader(y3(_data(32, seed=1)), batch_size=32)
    with pytest.raises(LoadError, match=r"(?s)epoch-0001.*model\.safetensors.*fc\.weight.*\(10, 16\).*\(3, 16\)"):
        finetune(_dlgn(num_classes=3), *loaders, epochs=2, out_dir=out, resume=True, **QUICK)


def test_cli_resume_from_a_damaged_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    """Item 3 through ``relu2dlgn finetune --resume``: a clean one-line LoadError naming the file, exit code 2."""
    out = tmp_path / "run"
    common = ["-q", "finetune", "_models:TinyNet", "--data", "digits", "--image-size", "8", "--batch-size", "512",
              "--out", str(out), "--no-progress", "--recalibrate-bn", "0"]
    assert run_cli(common + ["--epochs", "1"]) == 0
    (out / "checkpoints" / "epoch-0001" / "trainer.pt").write_bytes(b"\x80\x05garbage")
    capsys.readouterr()
    assert run_cli(common + ["--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relu2dlgn finetune: error: LoadError:") and "trainer.pt" in err and "\n" not in err


# -- 4. labels of any integer width train; others are refused up front -----------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_integer_labels_of_any_width_train(dtype):
    """Item 4: int32 labels used to crash inside the loss ("expected target dtype to be Long")."""
    res = finetune(_dlgn(), *_loaders(labels=dtype), epochs=1, **QUICK)
    assert res.history[-1]["epoch"] == 1 and res.history[-1]["train_loss"] == res.history[-1]["train_loss"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_float_and_bool_labels_are_refused(dtype):
    with pytest.raises(InputError, match=f"class indices.*{dtype}"):
        finetune(_dlgn(), *_loaders(labels=dtype), epochs=1, **QUICK)


# -- 5. an empty validation loader is refused ----------------------------------------------------------------

class _NoLength:
    def __iter__(self):
        return iter(())


@pytest.mark.parametrize("val", [[], DataLoader(TensorDataset(torch.zeros(0, 3, 12, 12), torch.zeros(0).long())),
                                 _NoLength()], ids=["list", "dataloader", "no-len"])
def test_empty_validation_loader_is_refused(val):
    """Item 5: it used to report "val_acc 0.0000 (best 0.0000 at epoch 0)"."""
    with pytest.raises(InputError, match="val_loader yields no batch"):
        finetune(_dlgn(), _loaders()[0], val, epochs=1, **QUICK)


# -- 6. the logits are chosen explicitly ---------------------------------------------------------------------

class FeaturesAndLogits(nn.Module):
    """Returns ``(features, logits)`` (or a dict of them): 16 features, 10 classes."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 10)
        self.as_dict = as_dict

    def forward(self, x):
        f = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return {"features": f, "logits": self.fc(f)} if self.as_dict else (f, self.fc(f))


def test_a_model_returning_features_and_logits_needs_the_logits_named():
    """Item 6: ``(features, logits)`` used to be trained silently on element 0 (the features)."""
    torch.manual_seed(0)
    model = FeaturesAndLogits().eval()
    with pytest.raises(InputError, match=r"(?s)tuple of 2.*logits="):
        finetune(relu2dlgn.convert(model), *_loaders(), epochs=1, **QUICK)
    dlgn = relu2dlgn.convert(model)
    trainer = Trainer(dlgn, *_loaders(), config=relu2dlgn.FinetuneConfig.from_options(epochs=1, logits=1, **QUICK))
    rec = trainer.evaluate()
    x, y = next(iter(_loaders()[1]))
    with torch.no_grad():
        logits = dlgn.eval()(x)[1]
    assert rec["val_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert rec["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    res = finetune(relu2dlgn.convert(model), *_loaders(), teacher=model, epochs=1, logits=1, **QUICK)
    assert "train_kd" in res.final and res.final["train_kd"] == res.final["train_kd"]


def test_dict_outputs_take_a_key_and_bad_choices_are_named():
    torch.manual_seed(0)
    model = FeaturesAndLogits(as_dict=True).eval()
    res = finetune(relu2dlgn.convert(model), *_loaders(), epochs=1, logits="logits", **QUICK)
    assert res.final["epoch"] == 1
    with pytest.raises(InputError, match=r"dict.*'features', 'logits'.*logits="):
        finetune(relu2dlgn.convert(model), *_loaders(), epochs=1, **QUICK)
    with pytest.raises(InputError, match=r"logits='scores'.*no key 'scores'.*'features', 'logits'"):
        finetune(relu2dlgn.convert(model), *_loaders(), epochs=1, logits="scores", **QUICK)
    with pytest.raises(InputError, match=r"logits=2.*tuple of 2"):
        finetune(relu2dlgn.convert(FeaturesAndLogits().eval()), *_loaders(), epochs=1, logits=2, **QUICK)
    with pytest.raises(InputError, match=r"logits=0.*tuple or list.*tensor of shape \(32, 10\)"):
        finetune(relu2dlgn.convert(_source()), *_loaders(), epochs=1, logits=0, **QUICK)
    with pytest.raises(OptionError, match=r"logits=1\.5"):
        relu2dlgn.FinetuneConfig.from_options(logits=1.5)


def test_the_logits_flag_takes_an_index_or_a_key():
    from relu2dlgn.cli.args import resolve
    from relu2dlgn.cli.main import build_parser
    from relu2dlgn.training.job import FinetuneJob
    parse = lambda *a: resolve(FinetuneJob, build_parser().parse_args(["finetune", "m:f", *a]))  # noqa: E731
    assert parse().training.logits is None
    assert parse("--logits", "1").training.logits == 1
    assert parse("--logits", "scores").training.logits == "scores"


# -- 7. the teacher is traced with the conversion's leaf_modules ------------------------------------------------

class Untraceable(nn.Module):
    """Linear, but with data-dependent control flow: torch.fx cannot trace into it."""

    def forward(self, x):
        return x * 2.0 if x.sum() > 0 else x * 2.0


class NeedsLeaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.odd, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Untraceable(), \
            nn.Linear(8, 10)

    def forward(self, x):
        x = self.odd(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_a_dlgn_remembers_its_leaf_modules_and_distils_from_its_source():
    """Item 7: finetune(teacher=model) used to re-trace the teacher without the conversion's leaf_modules."""
    torch.manual_seed(0)
    model = randomize_bn(NeedsLeaves()).eval()
    with pytest.raises(relu2dlgn.ConversionError):
        relu2dlgn.convert(model)
    # strict=False: an opaque leaf is never proven affine, and strict conversion refuses it (issue 9)
    dlgn = relu2dlgn.convert(model, leaf_modules=(Untraceable,), strict=False)
    assert dlgn.leaf_modules == (Untraceable,)
    res = finetune(dlgn, *_loaders(), teacher=model, epochs=1, **QUICK)
    assert "val_gate_agreement" in res.final


def test_leaf_modules_survive_save_and_load(tmp_path):
    dlgn = relu2dlgn.convert(randomize_bn(NeedsLeaves()).eval(), leaf_modules=(Untraceable, "conv"), strict=False)
    dlgn.save(tmp_path / "m")
    assert relu2dlgn.load(tmp_path / "m").leaf_modules == (Untraceable, "conv")


# -- 8. the teacher's train/eval flags are left exactly as given ------------------------------------------------

def test_teacher_modes_and_statistics_are_left_exactly_as_given():
    """Item 8: finetune used to leave the teacher's submodules in eval mode while its root stayed in train."""
    model = _source()
    model.train()
    model.bn2.eval()                                                   # a mixed-mode tree
    modes = {name: m.training for name, m in model.named_modules()}
    before = _state(model)
    finetune(relu2dlgn.convert(_source()), *_loaders(), teacher=model, epochs=1, **QUICK)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert _equal(_state(model), before)                             # the teacher is read, never trained

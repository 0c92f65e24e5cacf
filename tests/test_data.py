"""relu2dlgn.data: digits (offline), CIFAR from generated batch files in torchvision's format, ImageFolder."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from relu2dlgn.data import DataError, ShardSampler, load_data, make_loader, stratified_split


# ---------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------

def test_digits_shapes_split_and_channels():
    data = load_data("digits")
    assert data.num_classes == 10 and data.in_chans == 3 and data.image_size == 32
    assert len(data.train) + len(data.val) == 1797
    assert abs(len(data.val) - 450) <= 10
    x, y = data.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[1])  # grey replicated
    grey = load_data("digits", image_size=16, channels=1)
    assert grey.train[0][0].shape == (1, 16, 16) and grey.in_chans == 1
    # normalised with the training set's statistics
    xs = torch.stack([grey.train[i][0] for i in range(len(grey.train))])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


def test_digits_augmentation_is_seeded_and_val_is_fixed():
    data = load_data("digits", image_size=16)
    torch.manual_seed(3)
    a = [data.train[i][0] for i in range(8)]
    torch.manual_seed(3)
    b = [data.train[i][0] for i in range(8)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    torch.manual_seed(4)
    c = [data.train[i][0] for i in range(8)]
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    assert torch.equal(data.val[5][0], data.val[5][0])
    plain = load_data("digits", image_size=16, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0])


def test_stratified_split_is_disjoint_and_per_class():
    targets = torch.tensor([0] * 40 + [1] * 20 + [2] * 8)
    first, second = stratified_split(targets, 0.25, seed=0)
    assert not set(first) & set(second) and len(first) + len(second) == len(targets)
    assert [int((targets[second] == c).sum()) for c in range(3)] == [10, 5, 2]
    assert stratified_split(targets, 0.25, seed=0) == (first, second)


def test_bad_specs_are_named():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_data("mnist")
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        load_data("digits", channels=2)
    with pytest.raises(DataError, match="is not a directory"):
        load_data("imagefolder:/nonexistent/images")


# ---------------------------------------------------------------------------------------------------
# CIFAR: a few fake batch files in torchvision's pickle format
# ---------------------------------------------------------------------------------------------------

def _write_cifar(root: str, hundred: bool, per_batch: int = 6) -> None:
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder)
    classes = 100 if hundred else 10

    def batch(n: int) -> dict:
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        d["fine_labels" if hundred else "labels"] = rng.integers(0, classes, n).tolist()
        return d

    names = (["train"], ["test"]) if hundred else ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
    for name in names[0] + names[1]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch(per_batch), f)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else \
        {"label_names": [f"c{i}" for i in range(10)]}
    with open(os.path.join(folder, "meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)


@pytest.fixture
def no_md5(monkeypatch):
    """The fake files cannot match torchvision's MD5 sums; everything else is the real loading path."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


@pytest.mark.parametrize("name,hundred", [("cifar10", False), ("cifar100", True)])
def test_cifar_from_generated_batches(tmp_path, no_md5, name, hundred):
    _write_cifar(str(tmp_path), hundred)
    data = load_data(name, tmp_path, download=False)
    assert data.num_classes == (100 if hundred else 10) and data.image_size == 32
    assert len(data.train) == (6 if hundred else 30) and len(data.val) == 6
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    raw = data.val.data[0].astype(np.float32) / 255  # val: no augmentation, only normalisation
    mean = torch.tensor([0.4914, 0.4822, 0.4465] if not hundred else [0.5071, 0.4865, 0.4409])
    std = torch.tensor([0.2470, 0.2435, 0.2616] if not hundred else [0.2673, 0.2564, 0.2762])
    expect = (torch.from_numpy(raw).permute(2, 0, 1) - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(data.val[0][0], expect, atol=1e-5)
    big = load_data(name, tmp_path, image_size=40, channels=1)
    assert big.train[0][0].shape == (1, 40, 40)
    loader = make_loader(data.train, 4, train=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.long


def test_cifar_missing_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found.*download=True"):
        load_data("cifar10", tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# ImageFolder of PNGs
# ---------------------------------------------------------------------------------------------------

def _pngs(folder, classes=("cat", "dog"), n=3, size=20):
    from PIL import Image
    rng = np.random.default_rng(1)
    for c in classes:
        os.makedirs(folder / c, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder_train_val(tmp_path):
    _pngs(tmp_path / "train")
    _pngs(tmp_path / "val", n=2)
    data = load_data(f"imagefolder:{tmp_path}", image_size=16)
    assert data.num_classes == 2 and len(data.train) == 6 and len(data.val) == 4
    assert data.train[0][0].shape == (3, 16, 16) and data.val[3][0].shape == (3, 16, 16)
    assert data.val[3][1] == 1
    grey = load_data(f"imagefolder:{tmp_path}", image_size=16, channels=1)
    assert grey.val[0][0].shape == (1, 16, 16)


def test_imagefolder_single_folder_is_split(tmp_path):
    _pngs(tmp_path, n=10)
    data = load_data(f"imagefolder:{tmp_path}", image_size=12)
    assert len(data.train) == 18 and len(data.val) == 2
    assert sorted(y for _, y in (data.val[i] for i in range(2))) == [0, 1]


def test_imagefolder_errors(tmp_path):
    _pngs(tmp_path / "train", classes=("a", "b"))
    _pngs(tmp_path / "val", classes=("a", "c"))
    with pytest.raises(DataError, match="class folders .* differ"):
        load_data(f"imagefolder:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="one sub-folder of images per class"):
        load_data(f"imagefolder:{empty}")


# ---------------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------------

def test_make_loader_drop_last_and_shards():
    ds = torch.utils.data.TensorDataset(torch.randn(10, 2), torch.arange(10))
    assert len(make_loader(ds, 4, train=True)) == 2  # drops the incomplete batch
    assert len(make_loader(ds, 4, train=False)) == 3
    assert len(make_loader(ds, 16, train=True)) == 1  # a single (short) batch is kept
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    with pytest.raises(DataError, match="batch_size"):
        make_loader(ds, 0, train=True)

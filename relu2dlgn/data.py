"""Datasets and loaders for fine-tuning: CIFAR-10/100, an ImageFolder of your own images, and the offline
8x8 digits of scikit-learn.

``load_data(spec)`` understands

* ``cifar10`` / ``cifar100`` — torchvision's CIFAR under ``root`` (``download=True`` fetches it);
* ``imagefolder:PATH`` — ``PATH/train`` and ``PATH/val`` (or ``PATH/test``), one sub-folder per class; a
  folder without them is split 90/10 with a fixed seed;
* ``digits`` — scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download),
  upsampled to ``image_size`` (32) with 1 or 3 channels, split 75/25 per class with a fixed seed.

Training sets carry the standard augmentation (random crop with padding + horizontal flip for CIFAR,
random-resized crop + flip for image folders, random shifts of up to 2 pixels for digits); validation sets
none.  ``make_loader`` builds a ``DataLoader``, with a ``DistributedSampler`` when a process group is up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DataError
from .options import at_least, option

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "cifar100", "digits", "imagefolder:PATH")
_VAL_DIRS = ("val", "validation", "test")



@dataclass
class DataOptions:
    """Which data set and how it is loaded (the command line's and config files' data options)."""

    data: str = option("digits", "cifar10, cifar100, digits (offline) or imagefolder:PATH")
    data_root: str = option("data", "where CIFAR is (or goes with --download)")
    download: bool = option(False, "download CIFAR if it is not under data_root")
    image_size: int | None = option(None, "input side (default 32; 224 for imagefolder)", check=at_least(8))
    channels: Literal[1, 3] | None = option(None, "image channels (default 3)")
    batch_size: int = option(128, "global batch size (split over the processes)", check=at_least(1))
    workers: int | None = option(None, "data loader processes (default: 0 for digits, else up to 8)",
                                 check=at_least(0))


@dataclass
class Data:
    """A train/validation pair and what a model needs to know to consume it."""

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int

    def example_inputs(self, n: int = 2) -> tuple[torch.Tensor]:
        """A batch of ``n`` validation images, e.g. for ``convert(..., example_inputs=...)``."""
        return (torch.stack([self.val[i][0] for i in range(min(n, len(self.val)))]),)


def load_data(spec: str, root: str | os.PathLike = "data", *, image_size: int | None = None,
              channels: int | None = None, download: bool = False, augment: bool = True,
              val_fraction: float = 0.1, seed: int = 0) -> Data:
    """Build the train and validation datasets named by ``spec`` (see the module docstring).

    Args:
        spec: ``cifar10``, ``cifar100``, ``digits`` or ``imagefolder:PATH``.
        root: where CIFAR lives (or is downloaded to with ``download=True``).
        image_size: side of the (square) images the model gets; default 32 for CIFAR and digits, 224 for
            image folders.
        channels: 1 (grey) or 3 (RGB); default 3 for everything.
        download: CIFAR only: fetch it when it is not under ``root``.
        augment: apply training augmentation to the training set.
        val_fraction, seed: the split of an image folder that has no train/val sub-folders.
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise DataError(f"image_size must be an integer >= 8, got {image_size!r}")
    name = spec.lower()
    if name in ("cifar10", "cifar100"):
        return _cifar(name, os.fspath(root), image_size or 32, channels or 3, download, augment)
    if name == "digits":
        return _digits(image_size or 32, channels or 3, augment)
    if spec.startswith("imagefolder:"):
        return _imagefolder(spec.split(":", 1)[1], image_size or 224, channels or 3, augment, val_fraction, seed)
    raise DataError(f"unknown dataset '{spec}'; expected one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------------
# CIFAR and image folders (torchvision)
# --------------------------------------------------------------------------------------------------

def _tv_transforms(train: bool, augment: bool, size: int, native: int | None, channels: int,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    from torchvision import transforms as T

    ops: list[Any] = []
    if channels == 1:
        ops.append(T.Grayscale(1))
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if native is not None:  # CIFAR: pad-and-crop at the native size, then resize if asked
        if train and augment:
            ops += [T.RandomCrop(native, padding=native // 8), T.RandomHorizontalFlip()]
        if size != native:
            ops.append(T.Resize(size, antialias=True))
    elif train and augment:
        ops += [T.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()]
    else:
        ops += [T.Resize(int(round(size / 0.875)), antialias=True), T.CenterCrop(size)]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def _cifar(name: str, root: str, size: int, channels: int, download: bool, augment: bool) -> Data:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    mean, std = CIFAR_MEAN[name], CIFAR_STD[name]
    try:
        train = cls(root, train=True, download=download,
                    transform=_tv_transforms(True, augment, size, 32, channels, mean, std))
        val = cls(root, train=False, download=download,
                  transform=_tv_transforms(False, augment, size, 32, channels, mean, std))
    except RuntimeError as exc:
        hint = "" if download else "; pass download=True (CLI: --download) to fetch it"
        raise DataError(f"{label} not found or corrupted under '{os.path.abspath(root)}' "
                        f"(expected {os.path.join(root, cls.base_folder)}): {exc}{hint}") from None
    except OSError as exc:
        raise DataError(f"{label}: cannot read or download it under '{os.path.abspath(root)}': {exc}") from None
    return Data(name, train, val, 10 if name == "cifar10" else 100, channels, size)


def _imagefolder(path: str, size: int, channels: int, augment: bool, val_fraction: float, seed: int) -> Data:
    from torchvision import datasets

    if not path:
        raise DataError("imagefolder: needs a path, e.g. imagefolder:/data/my_images")
    if not os.path.isdir(path):
        raise DataError(f"imagefolder: '{path}' is not a directory")
    t_train = _tv_transforms(True, augment, size, None, channels, IMAGENET_MEAN, IMAGENET_STD)
    t_val = _tv_transforms(False, augment, size, None, channels, IMAGENET_MEAN, IMAGENET_STD)
    val_dir = next((os.path.join(path, d) for d in _VAL_DIRS if os.path.isdir(os.path.join(path, d))), None)

    def folder(p: str, transform: Callable) -> Any:
        try:
            return datasets.ImageFolder(p, transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"imagefolder: '{p}' must hold one sub-folder of images per class ({exc})") from None

    if os.path.isdir(os.path.join(path, "train")) and val_dir is not None:
        train, val = folder(os.path.join(path, "train"), t_train), folder(val_dir, t_val)
        if train.classes != val.classes:
            only_t = sorted(set(train.classes) - set(val.classes))
            only_v = sorted(set(val.classes) - set(train.classes))
            raise DataError(f"imagefolder: the class folders of '{os.path.join(path, 'train')}' and "
                            f"'{val_dir}' differ (only in train: {only_t[:5]}, only in val: {only_v[:5]})")
        classes = train.classes
    else:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        full_t, full_v = folder(path, t_train), folder(path, t_val)
        targets = torch.tensor(full_t.targets)
        train_idx, val_idx = stratified_split(targets, val_fraction, seed)
        if not val_idx:
            raise DataError(f"imagefolder: '{path}' has too few images ({len(targets)}) for a validation split")
        train, val = Subset(full_t, train_idx), Subset(full_v, val_idx)
        classes = full_t.classes
    return Data(f"imagefolder:{path}", train, val, len(classes), channels, size)


# --------------------------------------------------------------------------------------------------
# scikit-learn digits (offline)
# --------------------------------------------------------------------------------------------------

class DigitsDataset(Dataset):
    """Images of shape (channels, size, size), normalised; random shifts of up to ``shift`` pixels if set.

    The augmentation draws from torch's global generator (in a worker: the worker's seeded generator), so a
    run is reproducible from ``torch.manual_seed``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, channels: int, mean: float, std: float,
                 shift: int = 0):
        self.images, self.targets = images, targets  # images: (N, 1, S, S) in [0, 1]
        self.channels, self.mean, self.std, self.shift = channels, mean, std, shift

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.shift:
            s = self.shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = F.pad(x, (s, s, s, s))[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
        x = (x - self.mean) / self.std
        return x.expand(self.channels, -1, -1).contiguous(), int(self.targets[i])


def _digits(size: int, channels: int, augment: bool) -> Data:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn, or relu2dlgn[dev])") \
            from None
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), in [0, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    targets = torch.tensor(d.target, dtype=torch.long)
    train_idx, val_idx = stratified_split(targets, 0.25, seed=0)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    shift = max(1, size // 16) if augment else 0
    train = DigitsDataset(images[train_idx], targets[train_idx], channels, mean, std, shift)
    val = DigitsDataset(images[val_idx], targets[val_idx], channels, mean, std, 0)
    return Data("digits", train, val, 10, channels, size)


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices per class: ``round(fraction * n_c)`` of each class go to the second list."""
    g = torch.Generator().manual_seed(seed)
    first: list[int] = []
    second: list[int] = []
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = int(round(fraction * len(idx)))
        second += idx[:k]
        first += idx[k:]
    return sorted(first), sorted(second)


# --------------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------------

def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0, seed: int = 0,
                pin_memory: bool = False, distributed: bool | None = None) -> DataLoader:
    """A ``DataLoader`` over ``dataset``; ``batch_size`` is per process.

    Training loaders shuffle (epoch-seeded through ``DistributedSampler.set_epoch`` when distributed, from
    torch's global generator otherwise) and drop the last incomplete batch when there is more than one batch
    (a batch of one cannot be batch-normalised).  Validation loaders keep order and every sample; when
    distributed each process gets a disjoint shard (no padding, so no sample is counted twice).
    """
    import torch.distributed as dist

    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    sampler = None
    if distributed:
        if train:
            from torch.utils.data.distributed import DistributedSampler
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            sampler = ShardSampler(len(dataset), dist.get_rank(), dist.get_world_size())
    drop_last = train and len(dataset) > batch_size * (dist.get_world_size() if distributed else 1)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=pin_memory, drop_last=drop_last)


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: disjoint shards covering every sample once (for evaluation)."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

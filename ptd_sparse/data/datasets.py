"""Data sets held in memory as uint8 image tensors, a seeded validation split, their identity, and batches.
(A user's own data sets, data.factory and data.image_folder, are read sample by sample instead: streaming.py.)

Fashion-MNIST (default; the four idx .gz files, as Debian's dataset-fashion-mnist installs them), CIFAR-10/100 (the
python pickle batches, read with an unpickler that admits only plain containers and numpy arrays) and Tiny-ImageNet
(the standard folder of JPEGs; needs Pillow). Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ptd_sparse.data.array_pickle import load_arrays

FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                       "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")


@dataclass
class Split:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def subset(self, index: Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    train: Split  # or a streaming.StreamSplit (data.factory, data.image_folder): the same len, subset and batches
    val: Split
    test: Split
    num_classes: int
    mean: Tensor  # [C] of the training images in [0, 1]
    std: Tensor
    class_names: list[str] | None = None  # where the source names its classes (an image folder's subfolders)

    @property
    def in_channels(self) -> int:
        return int(self.train.image_shape[0])

    @property
    def image_size(self) -> int:
        return int(self.train.image_shape[1])


class MissingDataError(FileNotFoundError):
    """A data set is not where it was looked for; the message says how to get it."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (corrupt or wrong file)")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def load_fashion_mnist(root: Path | None) -> tuple[Split, Split, int]:
    root = Path(root) if root else FASHION_MNIST_DEFAULT
    missing = [name for name in FASHION_MNIST_FILES.values() if not (root / name).is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST is not in {root} (missing {', '.join(missing)}). Install it with "
            "`apt-get install -y dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), or set "
            "data.root to a folder holding the four idx .gz files.")
    arrays = {key: _read_idx(root / name) for key, name in FASHION_MNIST_FILES.items()}
    train = Split(torch.from_numpy(arrays["train_images"].copy())[:, None], torch.from_numpy(
        arrays["train_labels"].astype(np.int64)))
    test = Split(torch.from_numpy(arrays["test_images"].copy())[:, None], torch.from_numpy(
        arrays["test_labels"].astype(np.int64)))
    return train, test, 10


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = load_arrays(f.read())
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    labels = batch.get("labels", batch.get("fine_labels"))
    if "data" not in batch or labels is None:
        raise ValueError(f"{path} is not a CIFAR python batch (no data/labels)")
    return np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar(root: Path | None, classes: int) -> tuple[Split, Split, int]:
    folder = Path(root or ".") / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    if not folder.is_dir() and root and Path(root).is_dir():
        folder = Path(root)
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else [folder / "train"]
    test_file = folder / ("test_batch" if classes == 10 else "test")
    missing = [str(p) for p in train_files + [test_file] if not p.is_file()]
    if missing:
        raise MissingDataError(
            f"CIFAR-{classes} python batches not found (missing {', '.join(missing)}). Download "
            f"cifar-{classes}-python.tar.gz on a machine with internet access, unpack it and set data.root to the "
            "folder that holds it; nothing is downloaded at run time.")
    parts = [_read_cifar_batch(p) for p in train_files]
    train = Split(torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(
        np.concatenate([p[1] for p in parts])))
    test_images, test_labels = _read_cifar_batch(test_file)
    return train, Split(torch.from_numpy(test_images), torch.from_numpy(test_labels)), classes


def load_tiny_imagenet(root: Path | None) -> tuple[Split, Split, int]:
    folder = Path(root or ".")
    if not (folder / "wnids.txt").is_file():
        raise MissingDataError(f"Tiny-ImageNet not found in {folder} (no wnids.txt). Unpack tiny-imagenet-200.zip "
                               "and set data.root to its folder.")
    try:
        from PIL import Image
    except ImportError as error:
        raise MissingDataError("reading Tiny-ImageNet's JPEGs needs Pillow: `pip install pillow`") from error
    wnids = (folder / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}

    def load(paths_labels):
        images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
                           for p, _ in paths_labels])
        return Split(torch.from_numpy(images), torch.tensor([label for _, label in paths_labels]))

    train = [(p, index[w]) for w in wnids for p in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
    annotations = (folder / "val" / "val_annotations.txt").read_text().splitlines()
    val = [(folder / "val" / "images" / line.split("\t")[0], index[line.split("\t")[1]]) for line in annotations]
    return load(train), load(val), len(wnids)


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded random `fraction` of the training set held out for validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.val_fraction must lie in (0, 1), got {fraction}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held_out = int(round(fraction * len(train)))
    return train.subset(order[held_out:]), train.subset(order[:held_out])


def load_dataset(name: str, root: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                 train_subset: int | None = None) -> Dataset:
    """Load `name`, hold out a validation split, optionally keep a seeded subset of the training images."""
    if name == "fashion_mnist":
        train, test, classes = load_fashion_mnist(Path(root) if root else None)
    elif name in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(Path(root) if root else None, 10 if name == "cifar10" else 100)
    elif name == "tiny_imagenet":
        train, test, classes = load_tiny_imagenet(Path(root) if root else None)
    else:
        raise ValueError(f"data.name must be one of {DATASETS}, got {name!r}")
    train, val = split_validation(train, val_fraction, seed)
    if train_subset is not None:
        if train_subset <= 0:
            raise ValueError(f"data.train_subset must be a positive number of images, got {train_subset}")
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:train_subset]
        train = train.subset(keep)
    scaled = train.images.float() / 255
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return Dataset(name, train, val, test, classes, mean, std)


def dataset_identity(dataset: Dataset, split: str = "train") -> dict:
    """Name, split, sample count, image shape, classes and a sha256 of the split's images and labels in order
    (a reordered, resampled or relabelled split is another data set for the cache)."""
    part = getattr(dataset, split)
    if not isinstance(part, Split):  # a streaming split: a fingerprint instead of every image (streaming.py)
        return part.identity(dataset.name, split, dataset.num_classes, dataset.mean, dataset.std)
    digest = hashlib.sha256(part.images.contiguous().numpy().tobytes())
    digest.update(part.labels.contiguous().numpy().tobytes())
    return {"name": dataset.name, "split": split, "samples": len(part), "shape": list(part.images.shape[1:]),
            "classes": dataset.num_classes, "sha256": digest.hexdigest()}


def batches(split: Split, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
            world_size: int = 1):
    """Yield (index, images, labels) batches; with world_size > 1 each rank takes its own equal share. `index` holds
    the samples' positions in the split (what the teacher-logit cache is indexed by). A streaming split reads the same
    batches, in the same order, through its DataLoader."""
    if shuffle:
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    else:
        order = torch.arange(len(split))
    if world_size > 1:
        per_rank = len(order) // world_size
        order = order[rank * per_rank:(rank + 1) * per_rank]
    if not isinstance(split, Split):
        yield from split.stream(order, batch_size)
        return
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield index, split.images[index], split.labels[index]


def take_images(split: Split, index: Tensor) -> Tensor:
    """The images of positions `index` of an in-memory or a streaming split (a few: a streaming split reads them in
    this process)."""
    return split.images[index] if isinstance(split, Split) else split.read(index)[0]


def resolve_root(root: str | None) -> str | None:
    return os.path.expanduser(root) if root else None

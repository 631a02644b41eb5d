"""Data sets read sample by sample: a user's own torch Datasets (`data.factory`) or a folder of images
(`data.image_folder`), streamed through a DataLoader with worker processes instead of being held in memory.

A `StreamSplit` stands where an in-memory `Split` does: the same `len`, `subset` (so the seeded validation split and
`data.train_subset` pick the same positions as for the built-in data sets) and the same batches of
(index, images, labels), where `index` is each sample's position in the split. The batch order is the in-memory
path's (data.batches: a permutation seeded by the run's seed and the epoch, cut into equal contiguous shares for the
ranks of a torchrun); only the reading differs: a DataLoader whose batch sampler is exactly that order, its workers
reading and decoding the samples. So resume (an epoch's order depends on seed and epoch alone), DDP shards and the
teacher-logit cache (rows are positions in the training split) work as on the built-in data sets.

Images are uint8 [C, H, W] (values 0-255; PIL images are converted to this) or float [C, H, W] in [0, 1] (what
torchvision's ToTensor gives). The pipeline augments (data.crop_padding, data.flip) and normalises
((x - mean) / std with data.mean / data.std, or statistics computed from the training split) batches itself, as for
the built-in data sets; the source's own transforms must therefore be deterministic (a random transform would give the
teacher-logit cache and the student different images), and that is checked by reading one sample twice.

`settings` below is a configuration's [data] section, ptd_sparse.pipeline.config.DataConfig: its keys are attributes
(settings.factory, settings.workers, ...), typed and checked against each other when the section is built (this
package sits below the pipeline and does not import it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ptd_sparse.data.datasets import Dataset, load_dataset, resolve_root, split_validation
from ptd_sparse.named_callable import NamedCallableError, resolve_named_callable

logger = logging.getLogger("ptd_sparse.data")

STATS_SAMPLES = 4096  # training images the mean and std are computed from (all of them if there are fewer)
FINGERPRINT_SAMPLES = 8  # samples of a split read for its fingerprint, spread evenly over its positions
TEST_FOLDERS = ("test", "val")  # the held-out folder of data.image_folder, in the order looked for


class DataError(ValueError):
    """The data a configuration names cannot be used; the message names the key (data.factory, ...)."""


# -- samples --------------------------------------------------------------------------------------------------------

def _as_image(image, what: str) -> Tensor:
    """A sample's image as uint8 or float32 [C, H, W]; a PIL image becomes uint8 (its own channels for L and RGB,
    RGB for any other mode)."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(image, Tensor):
        raise DataError(f"{what} yields a {type(image).__name__} image; the pipeline takes a tensor [C, H, W] (uint8 "
                        "0-255, or float in [0, 1] as transforms.ToTensor gives) or a PIL image")
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3:
        raise DataError(f"{what} yields an image of shape {list(image.shape)}; the pipeline takes [C, H, W]")
    if image.dtype == torch.uint8:
        return image.contiguous()
    if image.is_floating_point():
        return image.float().contiguous()
    raise DataError(f"{what} yields {image.dtype} images; the pipeline takes uint8 (0-255) or float ([0, 1])")


def _as_label(label, what: str, classes: int) -> int:
    if isinstance(label, Tensor) and label.numel() == 1 and not label.is_floating_point() and \
            label.dtype != torch.bool:
        label = int(label.item())
    elif isinstance(label, np.integer):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{what} yields a label of type {type(label).__name__}; the pipeline takes an integer class "
                        "index (int or a one-element integer tensor)")
    if classes and not 0 <= label < classes:
        raise DataError(f"{what} yields label {label}, outside the {classes} classes [0, {classes - 1}] (the "
                        "source's `classes`, or data.num_classes)")
    return label


def read_sample(source, position: int, what: str, classes: int = 0) -> tuple[Tensor, int]:
    """(image, label) of source[position], checked and converted (see the module's docstring)."""
    item = source[position]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{what} yields a {type(item).__name__}, not an (image, label) pair")
    return _as_image(item[0], what), _as_label(item[1], what, classes)


class _Positions(torch.utils.data.Dataset):
    """Position p of a split -> (p, image, label), read in a DataLoader's worker."""

    def __init__(self, split: "StreamSplit"):
        self.source, self.indices, self.what, self.classes = split.source, split.indices, split.what, split.classes
        self.shape, self.dtype = split.shape, split.dtype

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        image, label = read_sample(self.source, int(self.indices[position]), self.what, self.classes)
        if tuple(image.shape) != self.shape or image.dtype != self.dtype:
            raise DataError(f"{self.what}: sample {int(self.indices[position])} is {image.dtype} "
                            f"{list(image.shape)}, the first training sample {self.dtype} {list(self.shape)}; every "
                            "image must have one shape and type (resize them in the factory's transform, or set "
                            "data.image_size for data.image_folder)")
        return position, image, label


@dataclass
class StreamSplit:
    """The samples at `indices` of a torch Dataset (`source`), read on demand. `what` names the split in errors
    ("data.factory pkg.mod:fn train set"), `workers` is data.workers."""

    source: object
    indices: Tensor  # int64 positions in `source`, in the split's order
    shape: tuple  # (C, H, W) of every image
    dtype: torch.dtype  # torch.uint8 or torch.float32
    classes: int
    what: str
    workers: int = 0
    description: dict = field(default_factory=dict)  # what the source is (factory and kwargs, or folder): its identity

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def image_shape(self) -> tuple:
        return self.shape

    def subset(self, index: Tensor) -> "StreamSplit":
        return replace(self, indices=self.indices[index])

    def read(self, positions) -> tuple[Tensor, Tensor]:
        """(images, labels) of `positions`, read in this process (for a few samples; batches use `stream`)."""
        items = [_Positions(self)[int(p)] for p in positions]
        return torch.stack([i[1] for i in items]), torch.tensor([i[2] for i in items], dtype=torch.int64)

    def loader(self, order: Tensor, batch_size: int) -> DataLoader:
        """A DataLoader over the positions of `order`, cut into consecutive batches of `batch_size`, read by
        data.workers worker processes (0: in this process) and yielded in that order."""
        cuts = [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]
        return DataLoader(_Positions(self), batch_sampler=cuts, num_workers=self.workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)

    def stream(self, order: Tensor, batch_size: int):
        """Yield (index, images, labels) of the positions in `order`, batch_size at a time (data.batches)."""
        for index, images, labels in self.loader(order, batch_size):
            yield index.to(torch.int64), images, labels.to(torch.int64)

    def reader(self, start: int, stop: int, batch_size: int) -> "SequentialReader":
        return SequentialReader(self, start, stop, batch_size)

    def identity(self, name: str, split: str, classes: int, mean: Tensor, std: Tensor) -> dict:
        """The cache's identity of this split: as data.dataset_identity's for an in-memory split, with a sha256 of
        a fingerprint instead of every image: the source's fingerprint (its files, or its description), the split's
        positions in order, the normalisation and FINGERPRINT_SAMPLES samples' bytes and labels."""
        digest = hashlib.sha256(source_fingerprint(self.description, self.source).encode())
        digest.update(self.indices.contiguous().numpy().tobytes())
        digest.update(json.dumps([mean.tolist(), std.tolist()]).encode())
        for position in _spread(len(self), FINGERPRINT_SAMPLES):
            _, image, label = _Positions(self)[position]
            digest.update(image.numpy().tobytes())
            digest.update(str(label).encode())
        return {"name": name, "split": split, "samples": len(self), "shape": list(self.shape), "classes": classes,
                "sha256": digest.hexdigest(), "fingerprint": "sampled"}


class SequentialReader:
    """Images of positions start..stop-1 of a StreamSplit, asked for in non-decreasing order (each position may be
    asked for several times in a row: the views of one sample), read batch_size samples at a time through the
    split's DataLoader; holds only the samples not yet passed."""

    def __init__(self, split: StreamSplit, start: int, stop: int, batch_size: int):
        self._batches = iter(split.loader(torch.arange(start, stop), max(1, batch_size)))
        self._first, self._images = start, []  # position of _images[0], images read and not yet passed

    def __call__(self, positions: Tensor) -> Tensor:
        low, high = int(positions.min()), int(positions.max())
        if low < self._first:
            raise ValueError(f"SequentialReader: position {low} was already passed (at {self._first})")
        del self._images[:low - self._first]
        self._first = low
        while self._first + len(self._images) <= high:
            self._images.extend(next(self._batches)[1].unbind(0))
        return torch.stack([self._images[int(p) - self._first] for p in positions])


def _spread(count: int, samples: int) -> list[int]:
    """Up to `samples` positions spread evenly over 0..count-1, the first and the last included."""
    if count <= samples:
        return list(range(count))
    return sorted({round(i * (count - 1) / (samples - 1)) for i in range(samples)})


# -- sources --------------------------------------------------------------------------------------------------------

def resolve_factory(name: str):
    """The function `package.module:function` names (ptd_sparse.named_callable)."""
    try:
        return resolve_named_callable(name)
    except NamedCallableError as error:
        raise DataError(f"data.factory {error}" if error.malformed else f"data.factory {name}: {error}") from error


def call_factory(name: str, kwargs: dict) -> tuple[object, object]:
    """(train, test) torch Datasets from the user's factory(**kwargs), checked to be sized and indexable."""
    result = resolve_factory(name)(**kwargs)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(f"data.factory {name} returned a {type(result).__name__}; it must return (train, test), two "
                        "torch Datasets yielding (image, label)")
    for part, dataset in zip(("train", "test"), result):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise DataError(f"data.factory {name} returned a {type(dataset).__name__} as its {part} set; it must be "
                            "a map-style torch Dataset (with __getitem__ and __len__; iterable datasets cannot be "
                            "indexed by the logit cache)")
        if len(dataset) == 0:
            raise DataError(f"data.factory {name} returned an empty {part} set")
    return result[0], result[1]


def image_folder(path: str, image_size: int) -> tuple[object, object, int]:
    """(train, test, image size) of torchvision ImageFolders over path/train and path/test (or path/val), one
    subfolder per class, every image resized (shorter side) and center-cropped to `image_size` (0: the shorter side
    of the first training image) and read as uint8 RGB. The test folder's classes are mapped to the training
    folder's indices (it may lack some classes, not have others)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.image_folder {root} is not a folder")
    held_out = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or held_out is None:
        raise DataError(f"data.image_folder {root} must hold train/ and test/ (or val/), each with one subfolder "
                        f"of images per class; found {sorted(p.name for p in root.iterdir())}")
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise DataError("data.image_folder reads images with torchvision: `pip install torchvision`") from error
    try:
        train = datasets.ImageFolder(str(root / "train"))
        test = datasets.ImageFolder(str(held_out))
    except (FileNotFoundError, RuntimeError) as error:  # a class folder without images, or no class folders
        raise DataError(f"data.image_folder {root}: {error}") from error
    if not image_size:
        image_size = min(train.loader(train.samples[0][0]).size)
    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.PILToTensor()])
    train.transform = test.transform = transform
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise DataError(f"data.image_folder: {held_out} has classes that train/ lacks: {unknown[:5]}")
    remap = {test.class_to_idx[name]: train.class_to_idx[name] for name in test.classes}
    test.samples = [(p, remap[label]) for p, label in test.samples]
    test.imgs, test.targets = test.samples, [label for _, label in test.samples]
    test.classes, test.class_to_idx = train.classes, train.class_to_idx
    return train, test, image_size


def source_fingerprint(description: dict, source) -> str:
    """A fingerprint of a whole source: its description (factory and kwargs, or folder and image size), its length,
    and, for folder data sets (torchvision's DatasetFolder, ImageFolder: a `samples` list of (path, class)), the
    sorted file list with each file's class and size (a cheap check that the files are the same)."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    digest.update(f"|{len(source)}|".encode())
    samples = getattr(source, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], (tuple, list)) and \
            isinstance(samples[0][0], (str, os.PathLike)):
        root = Path(getattr(source, "root", "") or "")
        for path, label in sorted((str(p), int(c)) for p, c in samples):
            relative = os.path.relpath(path, root) if root.parts else path
            digest.update(f"{relative}|{label}|{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def _num_classes(train, test, configured: int, what: str) -> int:
    """data.num_classes if set, else len(train.classes), else 1 + the largest label of `targets` (torchvision
    data sets), else of a pass over every label (slow for large data: set data.num_classes)."""
    if configured:
        return configured
    classes = getattr(train, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    labels = []
    for part in (train, test):
        targets = getattr(part, "targets", None)
        if targets is not None and len(targets) == len(part):
            labels.append(int(torch.as_tensor(targets).max()))
        else:
            logger.warning("%s: reading every label to count the classes (set data.num_classes to skip this)", what)
            labels.append(max(read_sample(part, i, what)[1] for i in range(len(part))))
    return max(labels) + 1


def _first_sample(source, what: str) -> tuple[Tensor, int]:
    """Sample 0 of `source`, read twice to check that the source's own transforms are deterministic."""
    image, label = read_sample(source, 0, what)
    again, label_again = read_sample(source, 0, what)
    if label != label_again or image.shape != again.shape or not torch.equal(image, again):
        raise DataError(f"{what} gives another image each time sample 0 is read: its transforms are random. The "
                        "pipeline augments itself (data.crop_padding, data.flip), so that the teacher-logit cache "
                        "replays the images the student sees; keep only deterministic transforms in the data set")
    return image, label


def _statistics(train: StreamSplit, seed: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of up to STATS_SAMPLES training images (a seeded choice) in [0, 1],
    as the in-memory path computes them over the whole training split (std with Bessel's correction)."""
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2))[:STATS_SAMPLES]
    total = torch.zeros(train.shape[0], dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    for _, images, _ in train.stream(chosen.sort().values, 256):
        scaled = images.double() / 255 if images.dtype == torch.uint8 else images.double()
        total += scaled.sum(dim=(0, 2, 3))
        squares += scaled.square().sum(dim=(0, 2, 3))
        count += scaled[:, 0].numel()
    mean = total / count
    variance = (squares - count * mean.square()) / max(count - 1, 1)
    return mean.float(), variance.clamp_min(0).sqrt().float().clamp_min(1e-6)


def _normalisation(settings, channels: int, train: StreamSplit, seed: int) -> tuple[Tensor, Tensor]:
    mean, std = settings.mean, settings.std
    if not mean and not std:
        return _statistics(train, seed)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) not in (1, channels):
            raise DataError(f"{key} has {len(values)} values; the images have {channels} channels (give one value "
                            f"or {channels})")
    mean_t = torch.tensor([float(v) for v in mean], dtype=torch.float32).expand(channels).clone()
    std_t = torch.tensor([float(v) for v in std], dtype=torch.float32).expand(channels).clone()
    return mean_t, std_t


def is_streaming(settings) -> bool:
    """Whether the [data] section names the user's data (data.factory or data.image_folder)."""
    return bool(settings.factory or settings.image_folder)


def load_streaming(settings, seed: int) -> Dataset:
    """The Dataset of data.factory or data.image_folder: StreamSplits for train, val and test, the validation split
    and the training subset chosen as load_dataset chooses them for the built-in data sets."""
    if settings.factory:
        name, kwargs = settings.factory, dict(settings.factory_kwargs)
        train_source, test_source = call_factory(name, kwargs)
        description = {"factory": name, "kwargs": kwargs}
        what = f"data.factory {name}"
    else:
        folder = str(Path(settings.image_folder).expanduser().resolve())
        train_source, test_source, size = image_folder(folder, settings.image_size)
        name, description, what = f"image_folder:{folder}", {"image_folder": folder, "image_size": size}, \
            f"data.image_folder {folder}"
    image, _ = _first_sample(train_source, f"{what} train set")
    test_image, _ = read_sample(test_source, 0, f"{what} test set")
    if tuple(test_image.shape) != tuple(image.shape) or test_image.dtype != image.dtype:
        raise DataError(f"{what}: the test set's images are {test_image.dtype} {list(test_image.shape)}, the "
                        f"training set's {image.dtype} {list(image.shape)}")
    classes = _num_classes(train_source, test_source, settings.num_classes, what)
    names = getattr(train_source, "classes", None)
    if isinstance(names, (list, tuple)) and names and len(names) != classes:
        raise DataError(f"data.num_classes is {classes} but {what}'s training set names {len(names)} classes")
    workers = settings.workers

    def split(source, part: str) -> StreamSplit:
        return StreamSplit(source, torch.arange(len(source)), tuple(image.shape), image.dtype, classes,
                           f"{what} {part} set", workers, {**description, "part": part})

    train, val = split_validation(split(train_source, "train"), settings.val_fraction, seed)
    subset = settings.train_subset or None
    if subset is not None:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:subset]
        train = train.subset(keep)
    mean, std = _normalisation(settings, image.shape[0], train, seed)
    return Dataset(name, train, val, split(test_source, "test"), classes, mean, std,
                   [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None)


def open_dataset(settings, seed: int) -> Dataset:
    """The data set of a configuration's [data] section: data.factory or data.image_folder streamed (load_streaming),
    else the built-in data.name loaded into memory (load_dataset, unchanged)."""
    if is_streaming(settings):
        return load_streaming(settings, seed)
    return load_dataset(settings.name, resolve_root(settings.root), settings.val_fraction, seed,
                        settings.train_subset or None)


def preprocessing(dataset: Dataset, settings) -> dict:
    """What a deployed model of this run expects of an image (a run's data.json, for ONNX Runtime and other
    consumers of `ptd export`): its input shape, the scaling and normalisation the pipeline applied, the classes."""
    record = {"data": dataset.name, "input": {"shape": [1, *map(int, dataset.train.image_shape)], "dtype": "float32",
                                             "layout": "NCHW"},
              "scale": "8-bit pixels divided by 255 (float images are taken as already in [0, 1])",
              "mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std],
              "normalise": "(x - mean) / std per channel", "classes": dataset.num_classes,
              "class_names": dataset.class_names}
    if settings.image_folder:
        record["resize"] = (f"shorter side to {dataset.image_size} pixels, then a center crop of "
                            f"{dataset.image_size}x{dataset.image_size}, RGB")
    return record


def check_model_fits(model: torch.nn.Module, dataset: Dataset, key: str) -> None:
    """Refuse a model (built by the factory `key` names) that does not take the data's images or does not give one
    output per class: a forward of two blank images in eval mode, without gradients."""
    shape = [2, dataset.in_channels, *dataset.train.image_shape[1:]]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(iter(model.parameters()), torch.zeros(())).device
            output = model(torch.zeros(shape, device=device))
    except Exception as error:  # noqa: BLE001 (any failure: the model does not take these images)
        raise DataError(f"{key} does not take the data's images [N, {', '.join(map(str, shape[1:]))}] (data.*): "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    finally:
        model.train(was_training)
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] != dataset.num_classes:
        got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise DataError(f"{key} gives outputs {got} for a batch of 2 but the data have {dataset.num_classes} classes "
                        f"({dataset.name}); build it with {dataset.num_classes} outputs (its kwargs) or set "
                        "data.num_classes")

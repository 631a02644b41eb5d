"""Small synthetic data in the real formats (idx .gz files, CIFAR python batches) for the pipeline tests."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ptd_sparse.data import FASHION_MNIST_FILES


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def learnable_images(count: int, classes: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright square at a class-specific position, plus noise: easy to learn fast."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    images = rng.integers(0, 60, (count, size, size))
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        images[i, 2 + 6 * row: 7 + 6 * row, 2 + 6 * col: 7 + 6 * col] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def fake_fashion_mnist(folder: Path, train: int = 600, test: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = learnable_images(train, 10, 0)
    test_images, test_labels = learnable_images(test, 10, 1)
    write_idx(folder / FASHION_MNIST_FILES["train_images"], train_images)
    write_idx(folder / FASHION_MNIST_FILES["train_labels"], train_labels)
    write_idx(folder / FASHION_MNIST_FILES["test_images"], test_images)
    write_idx(folder / FASHION_MNIST_FILES["test_labels"], test_labels)
    return folder


def fake_cifar10(folder: Path, per_batch: int = 20) -> Path:
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in rng.integers(0, 10, per_batch)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def tiny_run_overrides(data_root: Path) -> list[str]:
    """A whole `ptd run` in seconds: tiny data, one epoch everywhere, two pruning targets (the teacher at lr 0.1: the
    default 0.2 is for the default run's 14 epochs)."""
    return [f"data.root={str(data_root)!r}".replace("'", '"'), "data.train_subset=0", "data.batch_size=64",
            "teacher.epochs=2", "teacher.lr=0.1", "teacher.milestones=[1]", "prune.targets=[0.36, 0.59]", "prune.epochs=1",
            "distill.epochs=1", "distill.milestones=[]", "run.progress=false"]


def short_distill_args(command: str, out: Path, root: Path, *extra: str) -> list[str]:
    """`ptd <command>` on a tiny run: one teacher epoch, two distillation epochs of kd_unpruned, then `extra`."""
    result = [command, "--out", str(out)]
    for override in tiny_run_overrides(root) + ["teacher.epochs=1", "teacher.milestones=[]", "distill.epochs=2",
                                                'distill.variants=["kd_unpruned"]'] + list(extra):
        result += ["--set", override]
    return result

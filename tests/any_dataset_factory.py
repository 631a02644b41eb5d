"""Data factories for tests/test_any_dataset.py: small synthetic torch Datasets the pipeline reads through data.factory
(`any_dataset_factory:squares`), and factories that break the contract on purpose."""
from __future__ import annotations

import numpy as np
import torch
from pipeline_helpers import learnable_images


class Squares(torch.utils.data.Dataset):
    """learnable_images (a bright square per class, plus noise) as (uint8 [1, H, W] or float [1, H, W], int)."""

    def __init__(self, count: int, seed: int, as_float: bool = False, classes: int = 10):
        images, labels = learnable_images(count, classes, seed)
        self.images, self.labels, self.as_float = torch.from_numpy(images)[:, None], labels, as_float
        self.classes = [f"class_{i}" for i in range(classes)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        return (image.float() / 255 if self.as_float else image), int(self.labels[index])


def squares(train: int = 300, test: int = 60, as_float: bool = False):
    return Squares(train, 0, as_float), Squares(test, 1, as_float)


def not_a_pair():
    return Squares(10, 0)


def strings():
    return ["a", "b"], ["c"]


class _RandomFlip(Squares):
    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return (image.flip(2) if torch.rand(()) < 0.5 else image) + torch.randint(0, 2, ()).to(image.dtype), label


def random_transforms():
    return _RandomFlip(20, 0), Squares(10, 1)


class _BadLabels(Squares):
    def __getitem__(self, index):
        return self.images[index], "cat"


def bad_labels():
    return _BadLabels(20, 0), Squares(10, 1)


def numpy_images():
    class Arrays(Squares):
        def __getitem__(self, index):
            return np.zeros((1, 28, 28)), 0
    return Arrays(20, 0), Arrays(10, 1)


def tiny_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 8):
    """A user's model for the factory data (teacher.model = "any_dataset_factory:tiny_cnn")."""
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(width * 16, num_classes))

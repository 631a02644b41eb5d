"""Batched tensor augmentation: the random crop and flip of each image, drawn as `Views` and applied to a whole batch.

A teacher-logit cache stores the views it ran its teacher on and replays them, so views are data of their own,
separate from the images they apply to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ptd_sparse.data.datasets import Dataset


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0  # random crop of the original size from the zero-padded image; 0 = no crop
    flip: bool = False  # random horizontal flip


@dataclass
class Views:
    """The augmentation applied to each image of a batch (what a teacher-logit cache must replay)."""

    crop_y: Tensor  # int64 [B], offset into the padded image
    crop_x: Tensor
    flip: Tensor  # bool [B]


def sample_views(batch: int, augmentation: Augmentation, generator: torch.Generator) -> Views:
    pad = augmentation.crop_padding
    crop_y = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    crop_x = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5 if augmentation.flip else torch.zeros(batch, dtype=torch.bool)
    return Views(crop_y, crop_x, flip)


def apply_views(images: Tensor, views: Views, padding: int) -> Tensor:
    """Crop and flip a whole batch [B, C, H, W] at once with gathered indices (no per-image Python loop)."""
    if padding:
        batch, channels, height, width = images.shape
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        rows = (views.crop_y.to(images.device)[:, None] + torch.arange(height, device=images.device))
        cols = (views.crop_x.to(images.device)[:, None] + torch.arange(width, device=images.device))
        images = padded[torch.arange(batch, device=images.device)[:, None, None, None],
                        torch.arange(channels, device=images.device)[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
    flip = views.flip.to(images.device)[:, None, None, None]
    return torch.where(flip, images.flip(3), images)


def normalize(images: Tensor, dataset: Dataset) -> Tensor:
    """uint8 [B, C, H, W] (0-255), or float in [0, 1] (a streaming source's), -> float32 standardized with the
    training set's statistics."""
    mean = dataset.mean.to(images.device)[None, :, None, None]
    std = dataset.std.to(images.device)[None, :, None, None]
    scaled = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return (scaled - mean) / std

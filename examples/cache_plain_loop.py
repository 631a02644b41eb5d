"""A teacher-logit cache in your own training loop, without the ptd pipeline.

1. Precompute: ptd_sparse.cache.build_cache runs the pruned teacher once, in sparse inference form, over K augmented
   views of every training sample and stores its top-k logits.
2. Replay: a hand-written PyTorch loop asks the cache, for the sample indices of each batch and the epoch, for the
   views to apply (so the student sees exactly the images the teacher saw) and the teacher's output for kd_loss.

The data here are random images so that the example runs anywhere in seconds; with real data, build a
ptd_sparse.data.Dataset (or call ptd_sparse.data.load_dataset) instead of `random_dataset`.

    python examples/cache_plain_loop.py [cache folder]
"""
from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

import ptd_sparse
from ptd_sparse.cache import build_cache, make_spec, teacher_fingerprint
from ptd_sparse.data import Augmentation, Dataset, Split, apply_views, normalize
from ptd_sparse.nn import MaskedConv2d

TEMPERATURE, ALPHA = 4.0, 0.9


def random_dataset(samples: int, classes: int = 10, generator: torch.Generator | None = None) -> Dataset:
    """uint8 images [samples, 1, 16, 16] with random labels, standing in for a real data set."""
    def split(n):
        return Split(torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=generator),
                     torch.randint(0, classes, (n,), generator=generator))

    train = split(samples)
    scaled = train.images.float() / 255
    return Dataset("random", train, split(samples // 4), split(samples // 4), classes,
                   scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3)))


def pruned_teacher(classes: int, sparsity: float = 0.8) -> nn.Module:
    """A small convolutional teacher with most of its convolution weights masked away (as `ptd prune` leaves it)."""
    teacher = nn.Sequential(MaskedConv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                            MaskedConv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))
    for layer in teacher:
        if isinstance(layer, MaskedConv2d):
            layer.set_mask(torch.rand(layer.weight.shape) >= sparsity)
    return teacher.eval()


def main(folder: str, samples: int = 256, epochs: int = 2, views: int = 2, batch_size: int = 64) -> list[float]:
    """Precompute the cache in `folder`, then distill a student from it; returns the mean loss of each epoch."""
    torch.manual_seed(0)
    dataset = random_dataset(samples, generator=torch.Generator().manual_seed(0))
    augmentation = Augmentation(crop_padding=2, flip=True)
    teacher = pruned_teacher(dataset.num_classes)

    # 1. Precompute: the teacher's 5 most likely classes (and the mass outside them at TEMPERATURE) per view.
    spec = make_spec(teacher_fingerprint(teacher), dataset, augmentation, views=views, form="topk", k=5,
                     temperature=TEMPERATURE, chunk=128)
    cache = build_cache(folder, teacher, dataset, spec, batch_size=batch_size)

    # 2. Replay in a plain loop.
    student = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(16, dataset.num_classes))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(dataset.train))
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            views_of_batch = cache.views(index, epoch)  # epoch e replays view slot e mod K
            images = apply_views(dataset.train.images[index], views_of_batch, augmentation.crop_padding)
            labels = dataset.train.labels[index]
            loss = ptd_sparse.kd_loss(student(normalize(images, dataset)), cache.teacher(index, epoch), labels,
                                      temperature=TEMPERATURE, alpha=ALPHA)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(order))
        print(f"epoch {epoch + 1}: distillation loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(folder)

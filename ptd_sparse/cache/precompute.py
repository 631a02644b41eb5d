"""Precomputing a teacher cache: the pruned teacher in inference form run once over every view of every sample.

The teacher runs through ptd_sparse.sparsify (BatchNorm folded, ReLU fused, sparse kernels where they are faster,
measured per layer by inference.py) under inference mode. The K views of each sample are drawn up front from a seeded generator (the same table
on every rank), so the store is the same however many ranks write it. Under torchrun each rank takes every
world_size-th chunk; rank 0 creates the files before and writes the manifest after.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptd_sparse import distributed
from ptd_sparse.cache.inference import inference_form
from ptd_sparse.cache.replay import TeacherCache
from ptd_sparse.cache.store import CacheError, CacheSpec, StoreWriter, read_manifest
from ptd_sparse.cache.topk import topk_teacher
from ptd_sparse.data import (Augmentation, Dataset, Split, Views, apply_views, dataset_identity, normalize,
                             sample_views, take_images)
from ptd_sparse.files import write_json

logger = logging.getLogger("ptd_sparse.cache")

TUNING_BATCH = 64  # images of the example batch the inference form is prepared on
ROUTES_FILE = "routes.json"  # {layer: route} the cache's teacher ran with (cache/inference.py)
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def teacher_fingerprint(model: nn.Module, spec: dict | None = None) -> str:
    """sha256 over the model's architecture spec and every tensor of its state dict (weights, BatchNorm statistics
    and pruning masks) by name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(spec or {}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def view_table(samples: int, views: int, augmentation: Augmentation, seed: int) -> np.ndarray:
    """uint8 [samples, views, 3] (crop_y, crop_x, flip): view v of every sample drawn from its own seeded
    generator. Without augmentation every view is the identity (crop offset = padding, no flip)."""
    table = np.zeros((samples, views, 3), dtype=np.uint8)
    for v in range(views):
        drawn = sample_views(samples, augmentation, torch.Generator().manual_seed(seed * 1_000_003 + v))
        table[:, v, 0], table[:, v, 1], table[:, v, 2] = drawn.crop_y.numpy(), drawn.crop_x.numpy(), \
            drawn.flip.numpy()
    return table


def views_of(table: np.ndarray) -> Views:
    """Views of rows of a view table [B, 3]."""
    t = torch.from_numpy(table.astype(np.int64))
    return Views(t[:, 0], t[:, 1], t[:, 2].bool())


def make_spec(teacher: str, dataset: Dataset, augmentation: Augmentation, *, views: int = 1,
              form: str = "full", dtype: str = "float16", k: int = 10, temperature: float = 0.0,
              rest_mass: bool = True, seed: int = 0, chunk: int = 1024, split: str = "train") -> CacheSpec:
    """The spec of a cache of the teacher whose fingerprint is `teacher` over `dataset`'s `split`, K=`views` views
    per sample; `temperature` is recorded (and needed) only for top-k with rest mass."""
    identity = dataset_identity(dataset, split)
    topk = form == "topk"
    return CacheSpec(teacher=teacher, dataset=identity, samples=identity["samples"], views=views,
                     crop_padding=augmentation.crop_padding, flip=augmentation.flip, view_seed=seed,
                     classes=dataset.num_classes, form=form, dtype=dtype, k=k if topk else 0,
                     temperature=float(temperature) if topk and rest_mass else 0.0, rest_mass=topk and rest_mass,
                     chunk=chunk).check()


def _records(spec: CacheSpec, logits: torch.Tensor, table: np.ndarray) -> dict[str, np.ndarray]:
    """The store's records of one chunk from the teacher's float32 logits [n, K, C]."""
    n, k_views, classes = logits.shape
    dtype = TORCH_DTYPES[spec.dtype]

    def stored(values: torch.Tensor) -> np.ndarray:
        values = values.to(dtype)
        return (values.view(torch.int16) if dtype == torch.bfloat16 else values).numpy()

    records = {"views.bin": table}
    if spec.form == "full":
        records["logits.bin"] = stored(logits)
        return records
    top = topk_teacher(logits.reshape(n * k_views, classes), spec.k, spec.temperature or 1.0)
    records["indices.bin"] = top.indices.to(torch.int32).reshape(n, k_views, spec.k).numpy()
    records["values.bin"] = stored(top.logits.reshape(n, k_views, spec.k))
    if spec.rest_mass:
        records["rest.bin"] = top.rest_mass.float().reshape(n, k_views).numpy()
    return records


@torch.inference_mode()
def build_cache(folder: str | Path, teacher: nn.Module, dataset: Dataset, spec: CacheSpec, *, batch_size: int = 256,
                sparse: bool = True, device: torch.device | str = "cpu", on_chunk=None) -> TeacherCache:
    """Write (or finish, or just open) the cache `spec` of `teacher` in `folder`; returns it opened and verified.

    `teacher` is the pruned model as trained (MaskedConv2d layers); with sparse=True it runs in its inference form
    (ptd_sparse.sparsify with each pruned convolution's route fixed by the density rule, recorded in routes.json, see
    inference.py), else as given (the
    benchmark passes a prepared inference form or its dense eager baseline this way). Every rank of a running process group
    writes its share of the chunks. on_chunk(chunk) is called after each chunk this process writes (tests use it
    to interrupt a run)."""
    folder = Path(folder)
    if (folder / "manifest.json").exists():
        stored, _ = read_manifest(folder)
        if stored != spec:
            raise CacheError(f"{folder} holds a cache of something else ({spec.describe_difference(stored)}); delete "
                             "it or choose another folder")
        return TeacherCache(folder)
    writer = StoreWriter(folder, spec)
    if distributed.is_main():
        writer.create()
    distributed.barrier()
    split = getattr(dataset, spec.dataset["split"])
    if sparse and writer.pending(distributed.rank(), distributed.world_size()):
        example = normalize(take_images(split, torch.arange(min(batch_size, TUNING_BATCH, len(split)))).to(device),
                            dataset)
        model, routes = inference_form(teacher.to(device), example)
        if distributed.is_main():
            write_json(folder / ROUTES_FILE, routes)  # a record of the routes taken, for the run's readers
    else:
        model = teacher.eval().to(device)
    augmentation = Augmentation(spec.crop_padding, spec.flip)
    table = view_table(spec.samples, spec.views, augmentation, spec.view_seed)
    pending = writer.pending(distributed.rank(), distributed.world_size())
    started, done = time.perf_counter(), 0
    for chunk in pending:
        start, stop = writer.chunk_range(chunk)
        rows = (stop - start) * spec.views  # row r is view r % K of sample start + r // K
        logits = torch.empty(rows, spec.classes)
        flat = table[start:stop].reshape(rows, 3)
        # The images of sample positions: indexed in memory, or (a streaming split) read in position order through
        # its DataLoader, a batch of samples at a time; the rows and their batches are the same either way.
        images_of = split.images.__getitem__ if isinstance(split, Split) else \
            split.reader(start, stop, max(1, batch_size // spec.views))
        for first in range(0, rows, batch_size):
            last = min(first + batch_size, rows)
            samples = torch.arange(first, last) // spec.views + start
            images = apply_views(images_of(samples).to(device), views_of(flat[first:last]), spec.crop_padding)
            logits[first:last] = model(normalize(images, dataset)).float().cpu()
        writer.write(chunk, _records(spec, logits.reshape(stop - start, spec.views, spec.classes),
                                     table[start:stop]))
        done += rows
        if on_chunk is not None:
            on_chunk(chunk)
    if done:
        seconds = time.perf_counter() - started
        logger.info("cache %s: rank %d wrote %d views in %.1f s (%.0f views/s)", folder, distributed.rank(), done,
                    seconds, done / max(seconds, 1e-9))
    distributed.barrier()
    if distributed.is_main():
        writer.finish()
    distributed.barrier()
    return TeacherCache(folder)

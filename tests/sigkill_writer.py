"""Child process of tests/test_sigkill_writes.py: starts a real write and SIGKILLs itself in the middle of it.

    python sigkill_writer.py cache FOLDER TEACHER_DIR DATA_ROOT   # killed halfway through chunk 1's records
    python sigkill_writer.py model FOLDER                         # killed halfway through weights.safetensors
    python sigkill_writer.py state PATH                           # killed halfway through a training state

The kill comes from inside the write, after part of the bytes reached the file, which is the moment an atomic
write and a chunk marker written last must make harmless. A SIGKILL runs no handler, no finally and no cleanup.
"""
from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def cache_spec(teacher, dataset):
    from ptd_sparse.cache import make_spec, teacher_fingerprint
    from ptd_sparse.data import Augmentation

    return make_spec(teacher_fingerprint(teacher), dataset, Augmentation(2, True), views=2, chunk=100,
                     dtype="float32")


def write_cache(folder: Path, teacher_dir: Path, data_root: Path) -> None:
    from ptd_sparse.cache import build_cache
    from ptd_sparse.cache.store import StoreWriter
    from ptd_sparse.pipeline.checkpoint import load_model
    from ptd_sparse.data import load_dataset

    teacher, _ = load_model(teacher_dir)
    dataset = load_dataset("fashion_mnist", str(data_root))
    write = StoreWriter.write

    def write_half_then_die(self, chunk, records):
        if chunk != 1:
            return write(self, chunk, records)
        start, stop = self.chunk_range(chunk)
        for name in sorted(records):  # every file gets the first half of the chunk's records
            array = self.files().arrays[name]
            half = (stop - start) // 2
            array[start:start + half] = records[name][:half]
            array.flush()
        die()

    StoreWriter.write = write_half_then_die
    build_cache(folder, teacher.eval(), dataset, cache_spec(teacher, dataset), sparse=False)


def half_then_die(data: bytes, target) -> None:
    """Write the first half of `data` to `target` (a path, or a file opened for writing), then die."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            half_then_die(data, f)
    target.write(data[: len(data) // 2])
    target.flush()
    os.fsync(target.fileno())
    die()


def write_model(folder: Path) -> None:
    from safetensors.torch import save

    from ptd_sparse.pipeline import checkpoint
    from ptd_sparse.pipeline.models import build_model

    torch.manual_seed(1)
    model = build_model("vgg_fmnist", [8, "M", 8, "M"], in_channels=1, image_size=28)
    checkpoint.write_safetensors = lambda tensors, path: half_then_die(save(tensors), path)
    checkpoint.save_model(model, folder, {})


def write_state(path: Path) -> None:
    from ptd_sparse.pipeline import checkpoint

    save = torch.save

    def torch_save_half(state, target):
        buffer = io.BytesIO()
        save(state, buffer)
        half_then_die(buffer.getvalue(), target)

    checkpoint.torch.save = torch_save_half
    checkpoint.save_state(path, {"epoch": 2, "weights": torch.full((1000,), 2.0)})


if __name__ == "__main__":
    mode, *paths = sys.argv[1:]
    {"cache": write_cache, "model": write_model, "state": write_state}[mode](*map(Path, paths))
    sys.exit("the write finished; it should have been killed")  # never reached

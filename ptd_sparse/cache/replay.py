"""Reading a teacher cache back: the views to replay and the teacher's logits for a batch of sample indices.

The distillation loop asks, for the sample indices of its batch and the epoch, for the stored views (so the student
sees exactly the image the teacher saw) and the cached teacher output: dense logits [B, C] in the stored dtype, or a
TopKTeacher. Epoch e replays view slot e mod K of every sample, so with K = epochs every epoch gets a fresh view, as
on-the-fly augmentation would.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ptd_sparse.cache.store import CacheError, StoreFiles, _chunk_bytes, read_manifest
from ptd_sparse.cache.topk import TopKTeacher
from ptd_sparse.data import Views


class TeacherCache:
    """A complete, verified store opened read-only (memory-mapped: reads touch only the rows asked for).

    verify=True (the default) rehashes every chunk once at opening; sizes and the manifest are always checked."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        self.spec, hashes = read_manifest(self.folder)
        self._files = StoreFiles(self.folder, self.spec, "r")
        if verify:
            for chunk, expected in enumerate(hashes):
                start, stop = chunk * self.spec.chunk, min((chunk + 1) * self.spec.chunk, self.spec.samples)
                for name, array in self._files.arrays.items():
                    if hashlib.sha256(_chunk_bytes(array, start, stop)).hexdigest() != expected.get(name):
                        raise CacheError(f"{self.folder / name} is corrupt: samples {start}-{stop - 1} (chunk "
                                         f"{chunk}) do not match the hash in {self.folder / 'manifest.json'}")

    def expect(self, **expected) -> TeacherCache:
        """Refuse the cache unless its spec has these values (teacher=, dataset=, crop_padding=, flip=,
        classes=, ...); temperature= is checked only where the stored data depend on it (top-k with rest mass)."""
        temperature = expected.pop("temperature", None)
        wrong = [f"{key}: cache has {getattr(self.spec, key)!r}, expected {value!r}"
                 for key, value in expected.items() if getattr(self.spec, key) != value]
        if temperature is not None and self.spec.form == "topk" and self.spec.rest_mass and \
                abs(self.spec.temperature - temperature) > 1e-12 * max(1.0, temperature):
            wrong.append(f"temperature: the top-k rest mass was computed at T={self.spec.temperature}, the loss "
                         f"uses T={temperature} (a top-k cache holds only at its own temperature; a full-logit cache "
                         "works at any)")
        if wrong:
            raise CacheError(f"teacher cache {self.folder} does not match: " + "; ".join(wrong))
        return self

    def slot(self, epoch: int) -> int:
        return epoch % self.spec.views

    def _rows(self, name: str, index: Tensor, slot: int) -> np.ndarray:
        rows = index.cpu().numpy()
        if rows.size and (rows.min() < 0 or rows.max() >= self.spec.samples):
            raise IndexError(f"sample index out of range for teacher cache {self.folder} of {self.spec.samples} "
                             "samples")
        return self._files.arrays[name][rows, slot]

    def views(self, index: Tensor, epoch: int) -> Views:
        """The stored views of samples `index` [B] for `epoch`."""
        table = torch.from_numpy(self._rows("views.bin", index, self.slot(epoch)).astype(np.int64))
        return Views(table[:, 0], table[:, 1], table[:, 2].bool())

    def _tensor(self, name: str, index: Tensor, slot: int) -> Tensor:
        values = torch.from_numpy(self._rows(name, index, slot))
        return values.view(torch.bfloat16) if self.spec.dtype == "bfloat16" and name != "rest.bin" else values

    def teacher(self, index: Tensor, epoch: int, device: torch.device | str = "cpu") -> Tensor | TopKTeacher:
        """The cached teacher of samples `index` [B] for `epoch`: logits [B, C] (stored dtype), or a TopKTeacher
        (indices int32 [B, k], logits [B, k], rest_mass float32 [B] or None)."""
        slot = self.slot(epoch)
        if self.spec.form == "full":
            return self._tensor("logits.bin", index, slot).to(device, non_blocking=True)
        indices = torch.from_numpy(self._rows("indices.bin", index, slot)).to(device, non_blocking=True)
        logits = self._tensor("values.bin", index, slot).to(device, non_blocking=True)
        rest = torch.from_numpy(self._rows("rest.bin", index, slot)).to(device, non_blocking=True) \
            if self.spec.rest_mass else None
        return TopKTeacher(indices, logits, rest)

    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._files.arrays.values())

"""Content keys for caches derived from a weight (a dense copy, a prepacked weight, a compressed mask).

A tensor's version counter does not move for every public way of changing it: fused optimizers
(`torch.optim.Adam(..., fused=True)`), edits through `.data`, and writes through a NumPy view all change the
contents and leave `_version` as it was. A cache keyed on the version can therefore serve an answer computed from
old weights. `content_key` hashes the bytes instead (csrc/fingerprint.cpp: one pass at memory speed, about as much
as reading the tensor once), so a cache keyed on it is rebuilt after any change, however it was made.
"""
from __future__ import annotations

import functools
import hashlib

import torch
from torch import Tensor

from ptd_sparse._extension import extension_problem


@functools.cache
def _compiled():
    """The extension module where it loads, else None (a reference-only install). Looked up once."""
    if extension_problem() is not None:
        return None
    from ptd_sparse import _C

    return _C


def _hash_bytes(tensor: Tensor) -> int:
    if _compiled() is not None:
        return int(_compiled().fingerprint(tensor))
    # Without the extension (a reference-only install): the same guarantee, at hashlib's slower speed.
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def content_key(*tensors: Tensor) -> tuple:
    """A key that changes whenever the contents, shape, dtype or device of any of `tensors` (CPU tensors) change.
    Costs one read of each tensor."""
    key = []
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise ValueError(f"content_key hashes CPU tensors; got one on {tensor.device}")
        key.append((tuple(tensor.shape), tensor.dtype, _hash_bytes(tensor.detach())))
    return tuple(key)


def version_of(tensor: Tensor) -> int:
    """The tensor's version counter, -1 for an inference tensor (which has none)."""
    return -1 if tensor.is_inference() else tensor._version


def weight_key(values: Tensor, row_ptr: Tensor, col_idx: Tensor) -> tuple:
    """The key of a weight derived from sparse `values` under the pattern (row_ptr, col_idx) (SparseConv2d's dense
    copies, prepacked weight and transposed view; CPU tensors): the contents of all three (bytes, dtype, count), so
    no way of changing any of them leaves the key as it was. One extension call (csrc/fingerprint.cpp, weight_key):
    built here in Python it took ~30 us of a batch-1 layer's call."""
    if _compiled() is not None:
        return _compiled().weight_key(values, row_ptr, col_idx)  # a Parameter passes as it is
    for tensor in (values, row_ptr, col_idx):
        if tensor.device.type != "cpu":
            raise ValueError(f"weight_key: values, row_ptr and col_idx must be on the CPU; got one on {tensor.device}")
    return content_key(values, row_ptr, col_idx)

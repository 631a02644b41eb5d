"""Content keys for caches derived from a weight (a dense copy, a prepacked weight, a compressed mask).

A tensor's version counter does not move for every public way of changing it: fused optimizers
(`torch.optim.Adam(..., fused=True)`), edits through `.data`, and writes through a NumPy view all change the
contents and leave `_version` as it was. A cache keyed on the version can therefore serve an answer computed from
old weights. `content_key` hashes the bytes instead (csrc/fingerprint.cpp: one pass at memory speed, about as much
as reading the tensor once), so a cache keyed on it is rebuilt after any change, however it was made.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from ptd_sparse._extension import extension_problem


def _hash_bytes(tensor: Tensor) -> int:
    if extension_problem() is None:
        from ptd_sparse import _C

        return int(_C.fingerprint(tensor))
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

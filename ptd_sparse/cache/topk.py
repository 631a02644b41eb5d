"""Top-k teachers for the cache, and their dense equivalent.

A top-k cache stores, per view, the k largest logits, their class indices (int32: exact for any number of classes)
and the rest mass at the distillation temperature (ptd_sparse.topk_teacher, the contract kd_loss implements).
`dense_equivalent` turns a TopKTeacher back into dense logits [N, C] whose softmax at the temperature is exactly the
distribution kd_loss assigns to it (p_i = (1 - r) softmax(top-k / T)_i on the listed classes, r / (C - k) on every
other class): the oracle the cache's tests compare the top-k path against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptd_sparse.topk_teacher import TopKTeacher, topk_teacher  # noqa: F401 (the cache's top-k form)


def dense_equivalent(teacher: TopKTeacher, classes: int, temperature: float) -> Tensor:
    """float32 logits [N, classes] with softmax(logits / temperature) equal to the TopKTeacher's distribution;
    classes a renormalised teacher (rest mass 0) gives no probability get -inf."""
    indices, logits, rest = teacher
    rows, k = indices.shape
    rest = torch.zeros(rows, dtype=torch.float64, device=logits.device) if rest is None else rest.double()
    listed = torch.log_softmax(logits.double() / temperature, dim=1) + torch.log1p(-rest.clamp(max=1))[:, None]
    other = torch.log(rest / (classes - k)) if k < classes else torch.full_like(rest, -torch.inf)
    log_p = other[:, None].expand(rows, classes).clone()
    log_p.scatter_(1, indices.long(), listed)
    return (log_p * temperature).float()

"""Top-k teachers for the cache: the k largest logits of each row, their indices, and the rest of the mass.

`dense_equivalent` turns a TopKTeacher back into dense logits [N, C] whose softmax at the temperature is exactly the
distribution kd_loss assigns to the TopKTeacher (p_i = (1 - r) softmax(top-k / T)_i on the listed classes,
r / (C - k) on every other class). It is the oracle the tests compare kd_loss's top-k path against.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from ptd_sparse.topk_teacher import TopKTeacher, topk_teacher
except ImportError:  # until the KD loss's top-k teacher lands on this branch: the same contract, computed here
    from typing import NamedTuple

    class TopKTeacher(NamedTuple):
        indices: Tensor  # [N, k] int32 or int64, distinct class indices per row
        logits: Tensor  # [N, k] the teacher's logits of those classes
        rest_mass: Tensor | None = None  # [N] float32 probability outside the k classes at T; None = 0

    def topk_teacher(teacher_logits: Tensor, k: int, temperature: float) -> TopKTeacher:
        logits, indices = teacher_logits.topk(k, dim=1)
        log_p = torch.log_softmax(teacher_logits.double() / temperature, dim=1)
        rest = (1 - log_p.gather(1, indices).exp().sum(1)).clamp(0, 1).float()
        return TopKTeacher(indices.to(torch.int32), logits, rest)


def kd_loss_takes_topk() -> bool:
    """Whether ptd_sparse.kd_loss accepts a TopKTeacher in this build (else the cache densifies)."""
    import ptd_sparse

    return hasattr(ptd_sparse, "TopKTeacher")


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

"""A teacher given by its k most likely classes: what a logit cache stores instead of every class's logit.

Contract (shared by every backend of kd_loss): for a row with listed classes K (|K| = k of C) and rest mass r,
    p_i = (1 - r) * softmax(logits / T)_i   for i in K,
    p_j = r / (C - k)                        for every other class j,
so r is the teacher's probability outside its top k at the loss's temperature T, spread evenly over the classes it
does not list. With r equal to the full teacher's mass outside K (what `topk_teacher` computes), p equals the full
teacher's distribution on the listed classes exactly and the uniform maximum-entropy completion elsewhere; r = 0
renormalises the teacher over its top k. Because r depends on T, it is only valid at the temperature it was made for.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ptd_sparse import _validation as check


class TopKTeacher(NamedTuple):
    indices: Tensor  # [N, k] int32 or int64, distinct class indices per row
    logits: Tensor  # [N, k] the teacher's logits of those classes (float16, bfloat16, float32 or float64)
    rest_mass: Tensor | None = None  # [N] probability outside the k classes at the loss's temperature; None = 0


def topk_teacher(teacher_logits: Tensor, k: int, temperature: float) -> TopKTeacher:
    """The top-k form of dense teacher logits [N, C] at `temperature`, with its exact rest mass (float32)."""
    check.tensor(teacher_logits, "teacher_logits", dims=(2,), floating=True)
    classes = teacher_logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classes:
        raise ValueError(f"k must be an int in [1, {classes}] (the number of classes), got {k!r}")
    temperature = check.temperature(temperature)
    logits, indices = teacher_logits.topk(k, dim=1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, dim=1)
    listed = log_p.gather(1, indices).exp().sum(1)
    rest = (1 - listed).clamp(min=0, max=1).float() if k < classes else torch.zeros_like(listed, dtype=torch.float32)
    return TopKTeacher(indices.to(torch.int32), logits, rest)


def checked(teacher: TopKTeacher, student_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, logits, rest_mass as float32) after the checks of shapes, dtypes and devices; the values (ranges,
    repeated classes, NaN) are checked by the operator."""
    if len(teacher) != 3:
        raise TypeError("teacher must be a ptd_sparse.TopKTeacher(indices, logits, rest_mass)")
    indices, logits, rest_mass = teacher
    rows, classes = student_logits.shape
    check.tensor(indices, "teacher.indices", dims=(2,))
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher.indices must have dtype int32 or int64, got {indices.dtype}")
    check.tensor(logits, "teacher.logits", dims=(2,), floating=True)
    if logits.shape != indices.shape:
        raise ValueError(f"teacher.logits has shape {tuple(logits.shape)} but teacher.indices has shape "
                         f"{tuple(indices.shape)}; they must match")
    k = indices.shape[1]
    if indices.shape[0] != rows or not 1 <= k <= classes:
        raise ValueError(f"teacher.indices has shape {tuple(indices.shape)}; expected [{rows}, k] with 1 <= k <= "
                         f"{classes} for student_logits of shape {tuple(student_logits.shape)}")
    if rest_mass is None:
        rest_mass = torch.zeros(rows, dtype=torch.float32, device=student_logits.device)
    check.tensor(rest_mass, "teacher.rest_mass", dims=(1,), floating=True)
    if rest_mass.shape[0] != rows:
        raise ValueError(f"teacher.rest_mass has shape {tuple(rest_mass.shape)}; expected [{rows}]")
    check.same_device(student_logits, "student_logits", **{"teacher.indices": indices, "teacher.logits": logits,
                                                           "teacher.rest_mass": rest_mass})
    return indices.detach(), logits.detach(), rest_mass.detach().float()

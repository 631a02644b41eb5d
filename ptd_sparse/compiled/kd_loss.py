"""Fused KD loss on the compiled kernels: one kernel computes the loss and the student gradient."""
from __future__ import annotations

from torch import Tensor

from ptd_sparse._extension import kernels


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, temperature: float, alpha: float,
            reduction: int, ignore_index: int, compute_grad: bool) -> tuple[Tensor, Tensor]:
    return kernels().kd_loss(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index,
                             compute_grad)


def kd_loss_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor, teacher_rest_mass: Tensor,
                 target: Tensor | None, temperature: float, alpha: float, reduction: int, ignore_index: int,
                 compute_grad: bool) -> tuple[Tensor, Tensor]:
    return kernels().kd_loss_topk(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target,
                                  temperature, alpha, reduction, ignore_index, compute_grad)

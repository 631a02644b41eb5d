"""Fused KD loss on the native (C++/CUDA) kernels: one kernel computes the loss and the student gradient.

`differentiable` and `differentiable_topk` are the routes of the cpu and cuda backends (ptd_sparse/ops/kd_loss.py,
ROUTES and TOPK_ROUTES): the C++ operators ptd_sparse_kernels::kd_loss_differentiable and
kd_loss_topk_differentiable, whose autograd and autocast rules are registered in C++ (csrc/autograd/). The fake
kernels below give torch.compile the shapes of those and of the kernel operators their autograd calls.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptd_sparse._extension import extension_problem, kernel_operator
from ptd_sparse._kd_contract import check_topk_teacher, loss_like


# (student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index) -> loss: the C++ operator
# itself, bound once.
differentiable = kernel_operator("kd_loss_differentiable")
_differentiable_topk = kernel_operator("kd_loss_topk_differentiable")


def differentiable_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor,
                        teacher_rest_mass: Tensor, target: Tensor | None, temperature: float, alpha: float,
                        reduction: int, ignore_index: int) -> Tensor:
    # The teacher's values are checked on every route (the Python operator checks them in its body).
    check_topk_teacher(teacher_indices, teacher_logits, teacher_rest_mass, student_logits.shape[1])
    return _differentiable_topk(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target,
                                temperature, alpha, reduction, ignore_index)


def _register_fake() -> None:
    """Shapes for torch.compile and FakeTensor. The differentiable operators' C++ autograd runs above FakeTensor's
    dispatch key and calls the kernels, so they need fake implementations too."""

    @torch.library.register_fake("ptd_sparse_kernels::kd_loss")
    def _fake_kernel(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index,
                     compute_grad):
        grad = student_logits.new_empty(student_logits.shape if compute_grad else (0,))
        return loss_like(student_logits, reduction), grad

    @torch.library.register_fake("ptd_sparse_kernels::kd_loss_topk")
    def _fake_topk_kernel(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target, temperature,
                          alpha, reduction, ignore_index, compute_grad):
        grad = student_logits.new_empty(student_logits.shape if compute_grad else (0,))
        return loss_like(student_logits, reduction), grad

    @torch.library.register_fake("ptd_sparse_kernels::kd_loss_differentiable")
    def _fake(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index):
        return loss_like(student_logits, reduction)

    @torch.library.register_fake("ptd_sparse_kernels::kd_loss_topk_differentiable")
    def _fake_topk(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target, temperature, alpha,
                   reduction, ignore_index):
        return loss_like(student_logits, reduction)


if extension_problem() is None:
    _register_fake()

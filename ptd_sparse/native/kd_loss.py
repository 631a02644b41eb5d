"""Fused KD loss on the native (C++/CUDA) kernels: one kernel computes the loss and the student gradient.

The public function calls the C++ operators ptd_sparse_kernels::kd_loss_differentiable / kd_loss_topk_differentiable
for the cpu and cuda backends (autograd and autocast registered in C++, csrc/autograd/); `kd_loss` and
`kd_loss_topk` here serve the Python operators of ptd_sparse/ops/, which route any backend by name.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptd_sparse._extension import extension_problem, kernels
from ptd_sparse._kd_contract import REDUCTION_NONE


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, temperature: float, alpha: float,
            reduction: int, ignore_index: int, compute_grad: bool) -> tuple[Tensor, Tensor]:
    return kernels().kd_loss(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index,
                             compute_grad)


def kd_loss_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor, teacher_rest_mass: Tensor,
                 target: Tensor | None, temperature: float, alpha: float, reduction: int, ignore_index: int,
                 compute_grad: bool) -> tuple[Tensor, Tensor]:
    return kernels().kd_loss_topk(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target,
                                  temperature, alpha, reduction, ignore_index, compute_grad)


def loss_like(student_logits: Tensor, reduction: int) -> Tensor:
    """An empty loss of the right shape and dtype: [] or [N]; float32, float64 for float64 students."""
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be 2-D")
    shape = (student_logits.shape[0],) if reduction == REDUCTION_NONE else ()
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    return student_logits.new_empty(shape, dtype=dtype)


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

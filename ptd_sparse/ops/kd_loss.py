"""The fused KD loss: its Python operators, their one autograd rule, and its route tables (ROUTES for a dense
teacher, TOPK_ROUTES for a top-k one, at the end).

Schemas, and which backend each one serves:
- ptd_sparse_kernels::kd_loss_differentiable and kd_loss_topk_differentiable (C++, csrc/autograd/kd_loss_autograd.cpp):
  the `cpu` and `cuda` backends, autograd and autocast registered in C++, so an eager call crosses no Python layer
  after the public function.
- ptd_sparse::kd_loss, ptd_sparse::kd_loss_topk (the teacher given as its top-k classes) and
  ptd_sparse::kd_loss_backward, shared by both (torch.library.custom_op, here): the backends whose kernels are Python,
  `reference` and `triton`, chosen by the `backend` argument through the route tables. They stay opaque under
  torch.compile: the loss's error contract needs flags read on the host.

kd_loss returns (loss, grad_student): the fused kernels compute the gradient of the reduced loss with respect to the
student logits in the same pass as the loss, so the backward only scales that saved gradient by the incoming gradient
of the loss. That rule is written once per language: `_backward` below for the Python schemas, its C++ twin for the
extension's (a Python rule there would put a Python autograd node on every eager call of the default backends);
tests/test_native_ops.py checks that the two give the same gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ptd_sparse._kd_contract import REDUCTION_NONE, check_topk_teacher, loss_like
from ptd_sparse.native import kd_loss as native
from ptd_sparse.ops.autocast import register_autocast
from ptd_sparse.ops.route import Route, python_kernels
from ptd_sparse.reference import kd_loss as reference_kernels


def _triton_kernels():
    """The Triton kernels (kernels/kd_loss.py, installed as ptd_sparse.kernels), imported by the first call: they
    import triton, which importing ptd_sparse must not need."""
    from ptd_sparse.kernels import kd_loss as kernels
    return kernels


def _reference_kernels():
    return reference_kernels


@torch.library.custom_op("ptd_sparse::kd_loss", mutates_args=())
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor], temperature: float,
            alpha: float, reduction: int, ignore_index: int, compute_grad: bool,
            backend: str) -> Tuple[Tensor, Tensor]:
    """student_logits, teacher_logits [N, C]; target [N] or None; reduction 0 none / 1 sum / 2 batchmean.
    Returns (loss: [] or [N], float32 (float64 for float64 students); grad_student: [N, C] in the student's dtype,
    or empty when compute_grad is False)."""
    kernels = python_kernels(ROUTES, backend, "kd_loss")
    return kernels.kd_loss(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index,
                           compute_grad)


def _loss_and_grad_like(student_logits: Tensor, reduction: int, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    loss = loss_like(student_logits, reduction)
    grad = student_logits.new_empty(student_logits.shape if compute_grad else (0,))
    return loss, grad


@kd_loss.register_fake
def _kd_loss_fake(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index, compute_grad,
                  backend):
    return _loss_and_grad_like(student_logits, reduction, compute_grad)


@torch.library.custom_op("ptd_sparse::kd_loss_topk", mutates_args=())
def kd_loss_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor, teacher_rest_mass: Tensor,
                 target: Optional[Tensor], temperature: float, alpha: float, reduction: int, ignore_index: int,
                 compute_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """kd_loss with the teacher given as its top-k classes: teacher_indices [N, k] (int32/int64, distinct per row),
    teacher_logits [N, k], teacher_rest_mass [N] float32 (the teacher's probability outside the k classes at this
    temperature, spread evenly over the other C - k classes). Same outputs as kd_loss."""
    # The teacher's values are checked once per call on every route: O(N k) work, small next to the N x C student.
    check_topk_teacher(teacher_indices, teacher_logits, teacher_rest_mass, student_logits.shape[1])
    return python_kernels(TOPK_ROUTES, backend, "kd_loss_topk").kd_loss_topk(
        student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target, temperature, alpha, reduction,
        ignore_index, compute_grad)


@kd_loss_topk.register_fake
def _kd_loss_topk_fake(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target, temperature,
                       alpha, reduction, ignore_index, compute_grad, backend):
    return _loss_and_grad_like(student_logits, reduction, compute_grad)


@torch.library.custom_op("ptd_sparse::kd_loss_backward", mutates_args=())
def kd_loss_backward(grad_loss: Tensor, grad_student: Tensor, reduction: int) -> Tensor:
    """grad_loss [] or [N] (the incoming gradient), grad_student [N, C] saved by kd_loss -> gradient [N, C]."""
    scale = grad_loss[:, None] if reduction == REDUCTION_NONE else grad_loss
    return grad_student * scale.to(grad_student.dtype)


@kd_loss_backward.register_fake
def _kd_loss_backward_fake(grad_loss, grad_student, reduction):
    return torch.empty_like(grad_student)


def _setup_context(ctx, inputs, output):
    # Both losses end with (..., reduction, ignore_index, compute_grad, backend).
    ctx.reduction = inputs[-4]
    ctx.compute_grad = inputs[-2]
    ctx.inputs = len(inputs)
    loss, grad_student = output
    ctx.mark_non_differentiable(grad_student)
    ctx.save_for_backward(grad_student)


def _is_one(grad_loss: Tensor) -> bool:
    """True for the usual scalar gradient 1 of loss.backward(); checked only for plain eager CPU tensors, where reading
    the value is free (never while tracing, where the value is unknown)."""
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
    return eager and grad_loss.device.type == "cpu" and grad_loss.dim() == 0 and bool(grad_loss == 1)


def _backward(ctx, grad_loss, _unused_grad_of_grad_student):
    if not ctx.compute_grad:
        raise RuntimeError("kd_loss was called with compute_grad=False, so it saved no gradient to backpropagate; "
                           "call ptd_sparse.kd_loss, which sets it when student_logits requires grad")
    (grad_student,) = ctx.saved_tensors
    # loss.backward() passes 1: the saved gradient is the answer, and no second gradient-sized buffer is made.
    grad = grad_student if _is_one(grad_loss) else kd_loss_backward(grad_loss, grad_student, ctx.reduction)
    return (grad,) + (None,) * (ctx.inputs - 1)


kd_loss.register_autograd(_backward, setup_context=_setup_context)
kd_loss_topk.register_autograd(_backward, setup_context=_setup_context)
# Under torch.autocast the loss computes in float32, like F.cross_entropy.
register_autocast("ptd_sparse::kd_loss", torch.float32)
register_autocast("ptd_sparse::kd_loss_topk", torch.float32)


def _python_operators(backend: str):
    """(dense, top-k) calls of ptd_sparse::kd_loss and kd_loss_topk on `backend`, with the arguments of a route's
    call: the loss alone, its gradient computed in the same pass when autograd will ask for it."""

    def call(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index):
        compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
        return kd_loss(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index,
                       compute_grad, backend)[0]

    def call_topk(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target, temperature, alpha,
                  reduction, ignore_index):
        compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
        return kd_loss_topk(student_logits, teacher_indices, teacher_logits, teacher_rest_mass, target, temperature,
                            alpha, reduction, ignore_index, compute_grad, backend)[0]

    return call, call_topk


_triton_call, _triton_call_topk = _python_operators("triton")
_reference_call, _reference_call_topk = _python_operators("reference")
# Backend -> route of a dense teacher. Every call takes (student_logits, teacher_logits, target, temperature, alpha,
# reduction code, ignore_index) and returns the loss; the teacher needs no gradient (the public function detaches it).
ROUTES: dict[str, Route] = {
    "cpu": Route("ptd_sparse_kernels::kd_loss_differentiable", native.differentiable),
    "cuda": Route("ptd_sparse_kernels::kd_loss_differentiable", native.differentiable),
    "triton": Route("ptd_sparse::kd_loss", _triton_call, kernels=_triton_kernels),
    "reference": Route("ptd_sparse::kd_loss", _reference_call, kernels=_reference_kernels),
}
# Backend -> route of a top-k teacher: the same with the teacher as (indices, logits, rest_mass). Every route checks
# the teacher's values (ptd_sparse._kd_contract.check_topk_teacher) before its kernel runs.
TOPK_ROUTES: dict[str, Route] = {
    "cpu": Route("ptd_sparse_kernels::kd_loss_topk_differentiable", native.differentiable_topk),
    "cuda": Route("ptd_sparse_kernels::kd_loss_topk_differentiable", native.differentiable_topk),
    "triton": Route("ptd_sparse::kd_loss_topk", _triton_call_topk, kernels=_triton_kernels),
    "reference": Route("ptd_sparse::kd_loss_topk", _reference_call_topk, kernels=_reference_kernels),
}

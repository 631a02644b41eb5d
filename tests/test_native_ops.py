"""The native backends' differentiable operators (ptd_sparse_kernels::sparse_conv2d, kd_loss_differentiable,
kd_loss_topk_differentiable; autograd and autocast registered in C++): gradcheck, opcheck, and agreement with the
Python operators they stand in for on eager calls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_mask

import ptd_sparse
from ptd_sparse._extension import extension_problem

pytestmark = pytest.mark.skipif(extension_problem() is not None, reason=str(extension_problem()))


def conv_case(generator, dtype=torch.float64, batch=2, relu=False, bias=True):
    weight = torch.randn(5, 4, 3, 3, generator=generator, dtype=dtype)
    sparse = ptd_sparse.SparseConvWeight.from_dense(weight, random_mask(weight.shape, 0.4, generator))
    p = sparse.pattern
    x = torch.randn(batch, 4, 6, 5, generator=generator, dtype=dtype, requires_grad=True)
    b = torch.randn(5, generator=generator, dtype=dtype, requires_grad=True) if bias else None
    args = (x, sparse.values.requires_grad_(), p.row_ptr, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, list(p.shape), b,
            [1, 2], [1, 0], [1, 1], relu)
    return args, sparse


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_gradcheck_and_opcheck(relu, bias, generator):
    args, _ = conv_case(generator, relu=relu, bias=bias)
    op = torch.ops.ptd_sparse_kernels.sparse_conv2d
    differentiable = [0, 1, 8] if bias else [0, 1]  # input, values, bias

    def fn(*tensors):
        replaced = list(args)
        for position, tensor in zip(differentiable, tensors):
            replaced[position] = tensor
        return op(*replaced)

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in differentiable))
    torch.library.opcheck(op, args)


def test_conv_matches_the_python_operator_and_computes_only_needed_gradients(generator):
    """The C++ autograd rule of ptd_sparse_kernels::sparse_conv2d and the Python one of ptd_sparse::sparse_conv2d
    (ptd_sparse.ops.sparse_conv2d.autograd_rule, here on the reference kernels) give the same gradients."""
    args, sparse = conv_case(generator, dtype=torch.float32, batch=3, relu=True)
    out = torch.ops.ptd_sparse_kernels.sparse_conv2d(*args)
    expected = torch.ops.ptd_sparse.sparse_conv2d(*args[:-1], "reference", True)
    torch.testing.assert_close(out, expected)
    x, values, bias = args[0], args[1], args[8]
    got = torch.autograd.grad(out.sum(), (x, values, bias))
    want = torch.autograd.grad(expected.sum(), (x, values, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # Only the values need a gradient: the data-gradient kernel is not asked for.
    x.requires_grad_(False)
    (grad_values,) = torch.autograd.grad(torch.ops.ptd_sparse_kernels.sparse_conv2d(*args).sum(), values)
    torch.testing.assert_close(grad_values, want[1])


def test_conv_empty_batch_and_inference_mode(generator):
    args, _ = conv_case(generator, dtype=torch.float32, batch=0)
    out = torch.ops.ptd_sparse_kernels.sparse_conv2d(*args)
    assert out.shape == (0, 5, 6, 2)
    out.sum().backward()
    assert args[1].grad is not None and not args[1].grad.any()
    args, _ = conv_case(generator, dtype=torch.float32)
    with torch.inference_mode():
        assert torch.ops.ptd_sparse_kernels.sparse_conv2d(*args).shape == (2, 5, 6, 2)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_loss_gradcheck_and_opcheck(reduction, generator):
    student = torch.randn(6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    target = torch.tensor([0, 3, -100, 6, 1, 2])
    op = torch.ops.ptd_sparse_kernels.kd_loss_differentiable
    assert torch.autograd.gradcheck(lambda s: op(s, teacher, target, 2.0, 0.7, reduction, -100), (student,))
    torch.library.opcheck(op, (student, teacher, target, 2.0, 0.7, reduction, -100))
    topk = ptd_sparse.topk_teacher(teacher, 3, 2.0)
    op_topk = torch.ops.ptd_sparse_kernels.kd_loss_topk_differentiable
    assert torch.autograd.gradcheck(lambda s: op_topk(s, *topk, target, 2.0, 0.7, reduction, -100), (student,))
    torch.library.opcheck(op_topk, (student, *topk, target, 2.0, 0.7, reduction, -100))


def test_loss_backward_scales_by_the_incoming_gradient(generator):
    """The C++ autograd rule of the native loss operators and the Python one of ptd_sparse::kd_loss (on the
    reference backend) give the same gradients for an incoming gradient other than 1."""
    student = torch.randn(5, 4, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 4, generator=generator)
    loss = ptd_sparse.kd_loss(student, teacher, None, temperature=3.0, alpha=0.5, backend="cpu")
    (grad,) = torch.autograd.grad(loss * 2.5, student)
    (expected,) = torch.autograd.grad(2.5 * ptd_sparse.kd_loss(student, teacher, None, temperature=3.0, alpha=0.5,
                                                                backend="reference"), student)
    torch.testing.assert_close(grad, expected)
    per_row = ptd_sparse.kd_loss(student, teacher, None, temperature=3.0, alpha=0.5, reduction="none", backend="cpu")
    weights = torch.arange(5.0)
    (grad,) = torch.autograd.grad(per_row, student, weights)
    (expected,) = torch.autograd.grad(ptd_sparse.kd_loss(student, teacher, None, temperature=3.0, alpha=0.5,
                                                         reduction="none", backend="reference"), student, weights)
    torch.testing.assert_close(grad, expected)


def test_public_functions_use_the_native_operators(generator):
    """Eager calls of the cpu backend reach the C++ operators, not the Python custom ops: the autograd node is the
    C++ function's."""
    x = torch.randn(1, 3, 6, 6, generator=generator, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, generator=generator, requires_grad=True)
    out = ptd_sparse.masked_conv2d(x, weight, random_mask(weight.shape, 0.3, generator), padding=1, backend="cpu")
    assert "SparseConv2dFunction" in out.grad_fn.name()
    loss = ptd_sparse.kd_loss(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), backend="cpu")
    assert "KDLossFunction" in loss.grad_fn.name()

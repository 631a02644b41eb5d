"""ptd_sparse::sparse_conv2d and ptd_sparse::sparse_conv2d_backward.

out = F.conv2d(input, W, bias, stride, padding, dilation) where W is the dense weight whose nonzeros are given in the
canonical CSR format (ptd_sparse.pattern). Gradients: input, values (the nonzeros only) and bias.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ptd_sparse import _format_checks
from ptd_sparse.native import sparse_conv2d as compiled_impl
from ptd_sparse.conv_geometry import conv_output_shape
from ptd_sparse.ops.autocast import register_autocast
from ptd_sparse.reference import sparse_conv2d as reference_impl
from ptd_sparse.triton_kernels import sparse_conv2d as triton_impl

# Backend name -> module with forward(...) and backward(...) of the common signature.
IMPLEMENTATIONS = {"reference": reference_impl, "cpu": compiled_impl, "cuda": compiled_impl, "triton": triton_impl}


def _implementation(backend: str):
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"sparse_conv2d: backend {backend!r} has no implementation; available: "
                         f"{sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[backend]


@torch.library.custom_op("ptd_sparse::sparse_conv2d", mutates_args=())
def sparse_conv2d(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor, t_rows: Tensor,
                  t_perm: Tensor, weight_shape: List[int], bias: Optional[Tensor], stride: List[int],
                  padding: List[int], dilation: List[int], backend: str, relu: bool = False) -> Tensor:
    """input [N, C_in, H, W], values [nnz], CSR and transposed pattern (see ConvPattern) -> [N, C_out, OH, OW].
    relu=True applies max(0, .) in the kernel's epilogue (its gradient is masked by the saved output)."""
    _format_checks.check_sizes(weight_shape, row_ptr, col_idx, t_ptr, t_rows, t_perm, values)
    return _implementation(backend).forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding,
                                            dilation, relu)


@sparse_conv2d.register_fake
def _sparse_conv2d_fake(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding,
                        dilation, backend, relu=False):
    return input.new_empty(conv_output_shape(input, weight_shape, stride, padding, dilation))


@torch.library.custom_op("ptd_sparse::sparse_conv2d_backward", mutates_args=())
def sparse_conv2d_backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                           t_ptr: Tensor, t_rows: Tensor, t_perm: Tensor, weight_shape: List[int], stride: List[int],
                           padding: List[int], dilation: List[int], output_mask: List[bool],
                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input [N, C_in, H, W], grad_values [nnz], grad_bias [C_out]); an output not asked for by output_mask
    comes back empty."""
    grads = _implementation(backend).backward(grad_output.contiguous(), input, values, row_ptr, col_idx, t_ptr,
                                              t_rows, t_perm, weight_shape, stride, padding, dilation, output_mask)
    return tuple(g if g is not None else grad_output.new_empty(0) for g in grads)


@sparse_conv2d_backward.register_fake
def _sparse_conv2d_backward_fake(grad_output, input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape,
                                 stride, padding, dilation, output_mask, backend):
    shapes = (input.shape, values.shape, (weight_shape[0],))
    return tuple(grad_output.new_empty(shape if wanted else (0,)) for shape, wanted in zip(shapes, output_mask))


# Arguments every sparse convolution operator starts with, in this order: input, values, row_ptr, col_idx, t_ptr,
# t_rows, t_perm, weight_shape, bias, stride, padding, dilation; then operator-specific ones, then relu last.
_COMMON_ARGUMENTS = 12
_BIAS = 8


def autograd_rule(backward_op):
    """(setup_context, backward) of a sparse convolution operator, the one definition of its gradient for every
    route: ptd_sparse::sparse_conv2d (which carries its backend name after dilation) and the triton_op version that
    torch.compile traces (ptd_sparse/ops/triton_sparse_conv2d.py). `backward_op(grad_output, input, values, row_ptr,
    col_idx, t_ptr, t_rows, t_perm, weight_shape, stride, padding, dilation, output_mask, *extra)` computes
    (grad_input, grad_values, grad_bias), where `extra` are the operator-specific arguments."""

    def setup_context(ctx, inputs, output):
        input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding, dilation = \
            inputs[:_COMMON_ARGUMENTS]
        ctx.relu = inputs[-1]
        ctx.extra = tuple(inputs[_COMMON_ARGUMENTS:-1])
        ctx.n_inputs = len(inputs)
        # With a fused ReLU the output is saved too: its sign masks the incoming gradient.
        ctx.save_for_backward(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, output if ctx.relu else None)
        ctx.conv_args = (weight_shape, stride, padding, dilation)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_output):
        input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, output = ctx.saved_tensors
        if ctx.relu:
            grad_output = grad_output * (output > 0)
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[1], ctx.has_bias and needs[_BIAS]]
        # Gradients of sum() arrive as stride-0 views; the kernels read contiguous memory.
        grad_input, grad_values, grad_bias = backward_op(
            grad_output.contiguous(), input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, *ctx.conv_args,
            output_mask, *ctx.extra)
        grads = [None] * ctx.n_inputs
        grads[0] = grad_input if output_mask[0] else None
        grads[1] = grad_values if output_mask[1] else None
        grads[_BIAS] = grad_bias if output_mask[2] else None
        return tuple(grads)

    return setup_context, backward


_setup_context, _backward = autograd_rule(sparse_conv2d_backward)
sparse_conv2d.register_autograd(_backward, setup_context=_setup_context)
# Under torch.autocast the convolution runs in the autocast dtype, like F.conv2d.
register_autocast("ptd_sparse::sparse_conv2d", cast_to=None)

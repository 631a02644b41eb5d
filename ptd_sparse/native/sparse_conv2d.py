"""Sparse convolution on the native (C++/CUDA) kernels: forward, backward-data and backward-weight are separate kernels.

`differentiable` is what the public functions call for the cpu and cuda backends: the C++ operator
ptd_sparse_kernels::sparse_conv2d, whose autograd and autocast rules are registered in C++ (csrc/autograd/), so an
eager call crosses no Python layer after the public function. `forward` and `backward` serve the Python operator
ptd_sparse::sparse_conv2d (ptd_sparse/ops/), which routes any backend by name.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptd_sparse._extension import extension_problem, kernels
from ptd_sparse.conv_geometry import conv_output_shape


def differentiable(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor, t_rows: Tensor,
                   t_perm: Tensor, weight_shape: list[int], bias: Tensor | None, stride: list[int],
                   padding: list[int], dilation: list[int], relu: bool) -> Tensor:
    return kernels().sparse_conv2d(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride,
                                   padding, dilation, relu)


def forward(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int],
            bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], relu: bool) -> Tensor:
    return kernels().conv_forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation,
                                  relu)


def backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor,
             t_rows: Tensor, t_perm: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
             dilation: list[int], output_mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_values, grad_bias), None where output_mask is False."""
    ops = kernels()
    grad_input = grad_values = grad_bias = None
    if output_mask[0]:
        grad_input = ops.conv_backward_input(grad_output, values, col_idx, t_ptr, t_rows, t_perm, weight_shape,
                                             list(input.shape), stride, padding, dilation)
    if output_mask[1]:
        grad_values = ops.conv_backward_values(grad_output, input, row_ptr, col_idx, weight_shape, stride, padding,
                                               dilation)
    if output_mask[2]:
        grad_bias = grad_output.sum(dim=(0, 2, 3))
    return grad_input, grad_values, grad_bias


def _register_fake() -> None:
    """Shapes for torch.compile and FakeTensor. The differentiable operator's C++ autograd runs above FakeTensor's
    dispatch key and calls the kernels, so they need fake implementations too."""

    @torch.library.register_fake("ptd_sparse_kernels::sparse_conv2d")
    def _fake(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding, dilation,
              relu=False):
        return input.new_empty(conv_output_shape(input, weight_shape, stride, padding, dilation))

    @torch.library.register_fake("ptd_sparse_kernels::conv_forward")
    def _fake_forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu=False):
        return input.new_empty(conv_output_shape(input, weight_shape, stride, padding, dilation))

    @torch.library.register_fake("ptd_sparse_kernels::conv_backward_input")
    def _fake_backward_input(grad_output, values, col_idx, t_ptr, t_rows, t_perm, weight_shape, input_shape, stride,
                             padding, dilation):
        return grad_output.new_empty(input_shape)

    @torch.library.register_fake("ptd_sparse_kernels::conv_backward_values")
    def _fake_backward_values(grad_output, input, row_ptr, col_idx, weight_shape, stride, padding, dilation):
        return grad_output.new_empty(col_idx.shape)


if extension_problem() is None:
    _register_fake()

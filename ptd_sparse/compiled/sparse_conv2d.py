"""Sparse convolution on the compiled kernels: forward, backward-data and backward-weight are separate kernels."""
from __future__ import annotations

from torch import Tensor

from ptd_sparse._extension import kernels


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

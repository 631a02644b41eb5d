"""Reference sparse convolution: scatter the CSR values into a dense weight and call PyTorch's convolution."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def flat_positions(row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int]) -> Tensor:
    """Position of each CSR entry in the flattened dense weight."""
    c_out, c_in, kh, kw = weight_shape
    rows = torch.repeat_interleave(torch.arange(c_out, device=col_idx.device), (row_ptr[1:] - row_ptr[:-1]).long())
    return rows * (c_in * kh * kw) + col_idx.long()


def dense_weight(values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int]) -> Tensor:
    """The dense [C_out, C_in, KH, KW] weight holding `values` at the CSR positions."""
    flat = flat_positions(row_ptr, col_idx, weight_shape)
    return values.new_zeros(math.prod(weight_shape)).index_put((flat,), values).reshape(weight_shape)


def forward(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int],
            bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], relu: bool) -> Tensor:
    weight = dense_weight(values, row_ptr, col_idx, weight_shape)
    out = F.conv2d(input, weight, bias, stride, padding, dilation).contiguous()
    return F.relu(out) if relu else out


def backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor,
             t_rows: Tensor, t_perm: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
             dilation: list[int], output_mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_values, grad_bias), None where output_mask is False. The transposed pattern
    (t_ptr, t_rows, t_perm) is part of the common backend signature; the dense reference does not need it."""
    weight = dense_weight(values, row_ptr, col_idx, weight_shape)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output, input, weight, [weight_shape[0]], stride, padding, dilation, False, [0, 0], 1, output_mask)
    grad_values = None
    if output_mask[1]:
        grad_values = grad_weight.reshape(-1).index_select(0, flat_positions(row_ptr, col_idx, weight_shape))
    return grad_input, grad_values, grad_bias

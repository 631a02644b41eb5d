"""Reference sparse convolution: scatter the CSR values into a dense weight and call PyTorch's convolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ptd_sparse.pattern import dense_weight, flat_positions


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

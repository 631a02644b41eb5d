"""ptd_sparse::triton_sparse_conv2d(_backward): the triton backend's convolution made with torch.library.triton_op,
so that torch.compile traces through it into the Triton kernels (ptd_sparse.functional routes the triton backend's
CUDA calls here while compiling). ptd_sparse::sparse_conv2d stays a custom op, opaque to torch.compile, because
that form passes opcheck under the Triton interpreter and this one does not (docs/design.md, section 5): its
opcheck runs on a GPU only. Same autograd rule and autocast rule as ptd_sparse::sparse_conv2d.

Registering needs no triton; the kernels are imported by the first call (ptd_sparse.triton_kernels).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ptd_sparse.ops.autocast import register_autocast
from ptd_sparse.ops.sparse_conv2d import autograd_rule
from ptd_sparse.triton_kernels import kernel_module


@torch.library.triton_op("ptd_sparse::triton_sparse_conv2d", mutates_args=())
def triton_sparse_conv2d(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor,
                         t_rows: Tensor, t_perm: Tensor, weight_shape: List[int], bias: Optional[Tensor],
                         stride: List[int], padding: List[int], dilation: List[int], relu: bool) -> Tensor:
    """ptd_sparse::sparse_conv2d on the triton backend, traceable by torch.compile."""
    conv = kernel_module("sparse_conv2d")
    with conv.traced_launches():
        return conv.forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu)


@torch.library.triton_op("ptd_sparse::triton_sparse_conv2d_backward", mutates_args=())
def triton_sparse_conv2d_backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor,
                                  col_idx: Tensor, t_ptr: Tensor, t_rows: Tensor, t_perm: Tensor,
                                  weight_shape: List[int], stride: List[int], padding: List[int],
                                  dilation: List[int], output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """ptd_sparse::sparse_conv2d_backward on the triton backend, traceable by torch.compile."""
    conv = kernel_module("sparse_conv2d")
    with conv.traced_launches():
        grads = conv.backward(grad_output, input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape,
                              stride, padding, dilation, output_mask)
    return tuple(g if g is not None else grad_output.new_empty(0) for g in grads)


_setup_context, _backward = autograd_rule(triton_sparse_conv2d_backward)
triton_sparse_conv2d.register_autograd(_backward, setup_context=_setup_context)
# Under torch.autocast the convolution runs in the autocast dtype, like F.conv2d (and the other routes).
register_autocast("ptd_sparse::triton_sparse_conv2d", cast_to=None)

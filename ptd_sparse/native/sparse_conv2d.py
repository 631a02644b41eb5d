"""Sparse convolution on the native (C++/CUDA) kernels: forward, backward-data and backward-weight are separate
kernel operators (ptd_sparse_kernels::conv_forward, conv_backward_input, conv_backward_values), and
conv_forward_max_pool, the forward with a max-pool fused into its epilogue (inference).

`differentiable` is the route of the cpu and cuda backends (ptd_sparse/ops/sparse_conv2d.py, ROUTES): the C++
operator ptd_sparse_kernels::sparse_conv2d, whose autograd and autocast rules are registered in C++
(csrc/autograd/), so an eager call crosses no Python layer after the public function. The fake kernels below give
torch.compile the shapes of all five operators.
"""
from __future__ import annotations

import torch

from ptd_sparse._extension import extension_problem, kernel_operator
from ptd_sparse.conv_geometry import conv_output_shape, output_memory_format, output_size


# (input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding, dilation, relu=False)
# -> output: the C++ operator itself, bound once.
differentiable = kernel_operator("sparse_conv2d")

# (input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu=False) -> output: the forward
# kernel operator alone, without the autograd layer, for calls that want no gradient (SparseConv2d's inference calls).
forward_only = kernel_operator("conv_forward")

# (input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu, pool_kernel_size,
# pool_stride, pool_padding, pool_dilation) -> max_pool2d of the forward's output (floor mode), the pool fused into
# the forward's epilogue where the kernel can (CPU only: SparseConv2d's inference calls of a layer whose output only
# a max-pool reads).
forward_max_pool = kernel_operator("conv_forward_max_pool")


def _forward_output(input, weight_shape, stride, padding, dilation):
    """The forward's output, empty: its shape, and the input's layout (channels_last in, channels_last out)."""
    shape = conv_output_shape(input, weight_shape, stride, padding, dilation)
    return input.new_empty(shape).contiguous(memory_format=output_memory_format(input))


def _register_fake() -> None:
    """Shapes for torch.compile and FakeTensor. The differentiable operator's C++ autograd runs above FakeTensor's
    dispatch key and calls the kernels, so they need fake implementations too."""

    @torch.library.register_fake("ptd_sparse_kernels::sparse_conv2d")
    def _fake(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding, dilation,
              relu=False):
        return _forward_output(input, weight_shape, stride, padding, dilation)

    @torch.library.register_fake("ptd_sparse_kernels::conv_forward")
    def _fake_forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu=False):
        return _forward_output(input, weight_shape, stride, padding, dilation)

    @torch.library.register_fake("ptd_sparse_kernels::conv_forward_max_pool")
    def _fake_forward_max_pool(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu,
                               pool_kernel_size, pool_stride, pool_padding, pool_dilation):
        conv = _forward_output(input, weight_shape, stride, padding, dilation)
        shape = [*conv.shape[:2], *(output_size(conv.shape[2 + i], pool_kernel_size[i], pool_stride[i],
                                                          pool_padding[i], pool_dilation[i]) for i in range(2))]
        return conv.new_empty(shape).contiguous(memory_format=output_memory_format(conv))

    @torch.library.register_fake("ptd_sparse_kernels::conv_backward_input")
    def _fake_backward_input(grad_output, values, col_idx, t_ptr, t_rows, t_perm, weight_shape, input_shape, stride,
                             padding, dilation):
        return grad_output.new_empty(input_shape)

    @torch.library.register_fake("ptd_sparse_kernels::conv_backward_values")
    def _fake_backward_values(grad_output, input, row_ptr, col_idx, weight_shape, stride, padding, dilation):
        return grad_output.new_empty(col_idx.shape)


if extension_problem() is None:
    _register_fake()

"""The convolution's output-size arithmetic, written once for every route (fake kernels, checks, the reference)."""
from __future__ import annotations

import torch


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """F.conv2d's output size: floor((size + 2 padding - span) / stride) + 1, span = dilation (kernel - 1) + 1 the
    dilated kernel, which must fit the padded input (ValueError otherwise, as csrc/conv_geometry.h raises)."""
    span = dilation * (kernel - 1) + 1
    fits = size + 2 * padding >= span
    if fits is not True:  # False, or a symbolic size (fake tensors), which the check records as a guard
        torch._check_value(fits, lambda: f"input size {size} with padding {padding} is smaller than the dilated "
                                         f"kernel ({span}); the output would be empty")
    return (size + 2 * padding - span) // stride + 1


def conv_output_shape(input, weight_shape, stride, padding, dilation) -> tuple:
    """[N, C_out, OH, OW] of a convolution of `input` [N, C_in, H, W] (a tensor, real or fake) with a weight of
    `weight_shape`; checks what a fake kernel can (symbolic sizes allowed)."""
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
    torch._check(input.shape[1] == weight_shape[1],
                 lambda: f"input has {input.shape[1]} channels but weight_shape expects {weight_shape[1]}")
    out_h = output_size(input.shape[2], weight_shape[2], stride[0], padding[0], dilation[0])
    out_w = output_size(input.shape[3], weight_shape[3], stride[1], padding[1], dilation[1])
    return (input.shape[0], weight_shape[0], out_h, out_w)


def is_channels_last(input) -> bool:
    """Whether a 4-d `input` is laid out channels_last: NHWC-contiguous and not also NCHW-contiguous (as 1x1 maps
    and single channels are)."""
    return input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)


def output_memory_format(input) -> torch.memory_format:
    """The layout of a sparse convolution's forward output: the input's (channels_last in, channels_last out, as
    F.conv2d), decided as csrc/conv_geometry.h decides it for the native kernels."""
    return torch.channels_last if is_channels_last(input) else torch.contiguous_format

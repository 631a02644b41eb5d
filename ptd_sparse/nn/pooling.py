"""MaxPool2x2: the 2x2, stride-2 max-pool of the inference form, without max_pool2d's slow NCHW CPU kernel."""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ptd_sparse import _extension
from ptd_sparse.conv_geometry import is_channels_last
from ptd_sparse.nn.sparse_conv2d import _tracing

FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.cache
def _fused_kernel():
    return _extension.kernel_operator("max_pool2x2")


def _runs_fused(input: Tensor) -> bool:
    return (input.device.type == "cpu" and input.dtype in FUSED_DTYPES and
            (input.is_contiguous() or is_channels_last(input)) and
            not (input.requires_grad and torch.is_grad_enabled()) and _extension.extension_problem() is None and
            not _tracing())


class MaxPool2x2(nn.Module):
    """Exactly nn.MaxPool2d(2) (kernel 2, stride 2, no padding, floor mode) on [..., H, W]. On contiguous or
    channels_last CPU tensors without autograd it runs the extension's one-pass kernel (csrc/cpu/max_pool2x2_cpu.cpp;
    channels_last stays channels_last); elsewhere (other
    devices and layouts, gradients, traced or compiled graphs) the elementwise maximum of the four strided quarter
    views. torch's max_pool2d on contiguous NCHW CPU tensors is several times slower than either (it dominated the
    sparse inference time of the VGG teachers, docs/cache.md). NaN propagates as in max_pool2d. For inference: on
    ties the gradient would be split instead of routed to one input."""

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 3 or input.shape[-2] < 2 or input.shape[-1] < 2:
            raise ValueError(f"a 2x2 max-pool needs an input [..., H, W] with H, W >= 2, got shape "
                             f"{tuple(input.shape)}")
        if _runs_fused(input):
            return _fused_kernel()(input)
        height, width = input.shape[-2] // 2 * 2, input.shape[-1] // 2 * 2
        x = input[..., :height, :width]
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        """Whether `module` is a max-pool this class computes exactly."""
        def two(value) -> bool:
            return value in (2, (2, 2), [2, 2])

        return isinstance(module, nn.MaxPool2d) and two(module.kernel_size) and two(module.stride) and \
            module.padding in (0, (0, 0)) and module.dilation in (1, (1, 1)) and not module.ceil_mode and \
            not module.return_indices

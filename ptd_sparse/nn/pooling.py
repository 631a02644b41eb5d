"""Max-pools of the inference form without max_pool2d's slow NCHW CPU kernel: MaxPool2d (any window, floor mode, no
indices) and MaxPool2x2 (the common 2x2, stride-2 pool)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ptd_sparse import _extension
from ptd_sparse.conv_geometry import is_channels_last
from ptd_sparse.nn.tracing import tracing as _tracing

FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.cache
def _kernel(name: str):
    return _extension.kernel_operator(name)


def _two(value) -> tuple[int, int]:
    """An int or a sequence of one or two ints, as max_pool2d takes them, as a pair (what the kernel takes)."""
    pair = _pair(value)
    return (pair[0], pair[0]) if len(pair) == 1 else tuple(pair)


def _runs_fused(input: Tensor) -> bool:
    return (input.device.type == "cpu" and input.dtype in FUSED_DTYPES and
            (input.is_contiguous() or is_channels_last(input)) and
            not (input.requires_grad and torch.is_grad_enabled()) and _extension.extension_problem() is None and
            not _tracing())


class MaxPool2d(nn.Module):
    """Exactly nn.MaxPool2d(kernel_size, stride, padding, dilation) in floor mode without indices, on [C, H, W] or
    [N, C, H, W]. On contiguous or channels_last CPU tensors without autograd it runs the extension's kernel
    (csrc/cpu/max_pool2d_cpu.cpp; channels_last stays channels_last); elsewhere (other devices and layouts,
    gradients, traced or compiled graphs) torch's max_pool2d. torch's kernel on contiguous NCHW CPU tensors is many
    times slower: a ResNet stem's 3x3, stride-2 pool of 64 x 112 x 112 floats took 3.6 ms at batch 1 (this one
    0.14 ms) and 247 ms at batch 64 (30 ms; 2 cores, Zen 4). NaN propagates as in max_pool2d."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        super().__init__()
        self.kernel_size = _two(kernel_size)
        # As nn.MaxPool2d: no stride (None or an empty sequence) means the kernel size.
        self.stride = _two(kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0)
                           else stride)
        self.padding = _two(padding)
        self.dilation = _two(dilation)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() in (3, 4) and _runs_fused(input):
            return _kernel("max_pool2d")(input, self.kernel_size, self.stride, self.padding, self.dilation)
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}")

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        """Whether `module` is a max-pool this class computes exactly."""
        return isinstance(module, nn.MaxPool2d) and not module.ceil_mode and not module.return_indices

    @classmethod
    def of(cls, module: nn.MaxPool2d) -> MaxPool2d:
        """The MaxPool2d computing `module` (one that replaces() accepts)."""
        if not cls.replaces(module):
            raise ValueError(f"module must be an nn.MaxPool2d in floor mode without indices, got {module}")
        return cls(module.kernel_size, module.stride, module.padding, module.dilation)


class MaxPool2x2(nn.Module):
    """Exactly nn.MaxPool2d(2) (kernel 2, stride 2, no padding, floor mode) on [..., H, W]. On contiguous or
    channels_last CPU tensors without autograd it runs the extension's one-pass kernel (csrc/cpu/max_pool2d_cpu.cpp;
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
            return _kernel("max_pool2x2")(input)
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

"""Keeping a model's activations channels_last from its input on (sparsify(..., memory_format=torch.channels_last)).

oneDNN's dense convolutions (SparseConv2d's dense routes) run fastest on NHWC activations, and the sparse kernels,
MaxPool2x2, ReLU and residual additions read and write NHWC as cheaply as NCHW (csrc/cpu/wide_conv_f32.h, Layout).
Fed NCHW, each dense layer converts its input to NHWC and its output back: two copies of every activation it touches
(on the first convolution of a CIFAR VGG19 at batch 64, 16 MB each way). A forward pre-hook on the model converts
its 4-D tensor inputs to channels_last once instead; every layer then keeps that layout, as PyTorch's operators do,
so the model's 4-D outputs come back channels_last (a classifier's logits are 2-D and unaffected).

A model whose forward calls `.view` on a 4-D activation that is not also contiguous in NCHW cannot run this way
(use torch.flatten or reshape, as torchvision does), which is why sparsify does not do it by default.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# The attribute marking a model whose inputs the hook converts (so applying it twice installs one hook).
_MARK = "_ptd_sparse_input_memory_format"


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(arg.contiguous(memory_format=torch.channels_last) if isinstance(arg, Tensor) and arg.dim() == 4
                 else arg for arg in args)


def keep_channels_last(model: nn.Module) -> nn.Module:
    """Convert `model`'s 4-D tensor inputs to channels_last on every call (a forward pre-hook; in place)."""
    if not getattr(model, _MARK, False):
        model.register_forward_pre_hook(_to_channels_last)
        setattr(model, _MARK, True)
    return model


def keeps_channels_last(model: nn.Module) -> bool:
    """Whether keep_channels_last converts `model`'s inputs."""
    return bool(getattr(model, _MARK, False))


def wants_channels_last(memory_format) -> bool:
    """sparsify's `memory_format`: None or torch.contiguous_format keep the caller's layout (False);
    torch.channels_last keeps activations NHWC from the model's input on (True). Anything else is refused."""
    if memory_format is None or memory_format == torch.contiguous_format:
        return False
    if memory_format != torch.channels_last:
        raise ValueError(f"memory_format must be None, torch.contiguous_format or torch.channels_last, got "
                         f"{memory_format!r}")
    return True

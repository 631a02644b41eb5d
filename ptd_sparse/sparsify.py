"""sparsify(model): turn a pruned model's convolutions into SparseConv2d modules for inference.

A convolution counts as pruned when it is a MaskedConv2d (its `mask` buffer) or carries a mask from
torch.nn.utils.prune (`weight_orig` and `weight_mask`). Convolutions that SparseConv2d cannot express (groups != 1,
asymmetric or non-zero padding) keep running densely on weight * mask and are reported in the log.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from ptd_sparse.nn.masked_conv2d import MaskedConv2d
from ptd_sparse.nn.sparse_conv2d import SparseConv2d, explicit_padding

_logger = logging.getLogger("ptd_sparse")


def pruned_weight_and_mask(conv: nn.Conv2d) -> tuple[Tensor, Tensor] | None:
    """(weight * mask, mask) of a pruned convolution, or None if it carries no mask."""
    if isinstance(conv, MaskedConv2d):
        return conv.weight * conv.mask, conv.mask
    if hasattr(conv, "weight_orig") and hasattr(conv, "weight_mask"):  # torch.nn.utils.prune
        return conv.weight_orig * conv.weight_mask, conv.weight_mask
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _copy(model: nn.Module) -> nn.Module:
    """deepcopy, except that torch.nn.utils.prune's computed `weight` (a non-leaf tensor, which deepcopy refuses) is
    copied detached; the prune hook recomputes it from weight_orig * weight_mask on the next forward anyway."""
    memo = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "weight_mask") and isinstance(weight, Tensor) and not weight.is_leaf:
            memo[id(weight)] = weight.detach().clone()
    return copy.deepcopy(model, memo)


@torch.no_grad()
def sparsify(model: nn.Module, inplace: bool = False, backend: str | None = None) -> nn.Module:
    """Return `model` (a copy unless inplace) with every pruned groups=1 convolution replaced by a SparseConv2d that
    stores only the nonzeros. The rest of the model is unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else _copy(model)
    for name, module in list(target.named_modules()):
        if not isinstance(module, nn.Conv2d):
            continue
        found = pruned_weight_and_mask(module)
        if found is None:
            continue
        if module.groups != 1 or explicit_padding(module) is None:
            _logger.warning("ptd_sparse.sparsify: %s stays dense (groups=%d, padding=%r, padding_mode=%r)", name,
                            module.groups, module.padding, module.padding_mode)
            continue
        weight, mask = found
        dense = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.detach())
        dense.bias = module.bias
        _replace(target, name, SparseConv2d.from_conv(dense, mask, backend=backend))
    return target

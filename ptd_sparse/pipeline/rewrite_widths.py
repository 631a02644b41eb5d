"""Build a student from any model and a width map (ptd_sparse.pipeline.design.WidthDesign.width_map): a copy of the
model whose convolutions, BatchNorms and linear layers are replaced by fresh, randomly initialised modules of the
same classes with the new widths. The model's own forward runs unchanged on them: only shapes change.

Pruning state is not carried over (a student starts dense, from random initialisation, as the paper trains it):
torch.nn.utils.prune's hooks and masks live on the replaced modules and go with them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _conv(conv: nn.Conv2d, c_in: int, c_out: int, groups: int) -> nn.Conv2d:
    # type(conv) keeps the user's class (MaskedConv2d included); padding as given (ints or 'same').
    return type(conv)(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups,
                      conv.bias is not None, conv.padding_mode, device=conv.weight.device)


def rewrite_widths(model: nn.Module, width_map: dict) -> nn.Module:
    """A copy of `model` with the widths of `width_map` ({"convs": {name: [in, out, groups]}, "batch_norms": {name:
    features}, "linears": {name: [in, teacher in]}}); every replaced module freshly initialised."""
    for key in ("convs", "batch_norms", "linears"):
        if not isinstance(width_map.get(key), dict):
            raise ValueError(f"width_map must have a dict {key!r}; got {type(width_map.get(key)).__name__}")
    memo = {}
    for module in model.modules():  # torch.nn.utils.prune's computed weight is a non-leaf: deepcopy refuses it
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_leaf:
            memo[id(weight)] = weight.detach().clone()
    student = copy.deepcopy(model, memo)
    for name, (c_in, c_out, groups) in width_map["convs"].items():
        conv = student.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"width_map names {name} as a convolution but the model has a {type(conv).__name__}")
        _replace(student, name, _conv(conv, int(c_in), int(c_out), int(groups)))
    for name, features in width_map["batch_norms"].items():
        bn = student.get_submodule(name)
        _replace(student, name, type(bn)(int(features), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                         device=bn.running_mean.device if bn.running_mean is not None else None))
    for name, (c_in, teacher_in) in width_map["linears"].items():
        linear = student.get_submodule(name)
        if linear.in_features % int(teacher_in):
            raise ValueError(f"{name} reads {linear.in_features} features from {teacher_in} channels; a flatten "
                             "over a spatial map would need whole multiples")
        per_channel = linear.in_features // int(teacher_in)
        _replace(student, name, type(linear)(int(c_in) * per_channel, linear.out_features, linear.bias is not None,
                                             device=linear.weight.device))
    return student

"""The teacher's inference form for a cache: sparsify, then one call on a batch of the cache's size, in which every
pruned convolution measures its routes (sparse kernel, dense NCHW, dense channels_last) on the real activations and
keeps the fastest (ptd_sparse.nn.measured_route).

A cache runs its teacher over every view of a data set, so the measurement, once per layer, costs little; it picks
right for this machine and these shapes, where a density crossover measured on other layers would not (a first
convolution with one or three input channels gains from the sparse kernel even at 88% density).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ptd_sparse.nn import SparseConv2d
from ptd_sparse.sparsify import sparsify

logger = logging.getLogger("ptd_sparse.cache")


@torch.inference_mode()
def inference_form(teacher: nn.Module, example: Tensor) -> nn.Module:
    """sparsify(teacher) on example's device, with each pruned convolution's route measured on the activations that
    `example` [B, C, H, W] (a batch of the cache's size) produces. Returns a new module in eval mode; the choices are
    logged."""
    model = sparsify(teacher).to(example.device)
    model(example)
    for name, module in model.named_modules():
        if isinstance(module, SparseConv2d):
            logger.info("cache teacher %s (density %.3f): %s", name, module.density,
                        ", ".join(sorted(set(module.routes.values()))))
    return model

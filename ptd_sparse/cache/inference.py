"""The teacher's inference form for a cache: sparsify with routes fixed by the deterministic density rule
(ptd_sparse.nn.measured_route, policy "density"), so that a cache's bytes depend only on the teacher's weights and
the data, never on timings: two runs of one configuration write identical caches whatever the machine's load.

The measured routes would pick per layer whichever of the sparse kernel and oneDNN was faster on the first call;
their results agree to about 1e-6, but a float16 cache stores those last bits and the students trained from it
then differ. The routes taken are logged and recorded in the cache's folder (routes.json).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ptd_sparse.nn import SparseConv2d
from ptd_sparse.nn import measured_route
from ptd_sparse.sparsify import sparsify

logger = logging.getLogger("ptd_sparse.cache")


@torch.inference_mode()
def inference_form(teacher: nn.Module, example: Tensor) -> tuple[nn.Module, dict[str, str]]:
    """(sparsify(teacher) on example's device with the density rule's routes, {layer name: route}). `example`
    [B, C, H, W] is a batch of the cache's size; the routes are those its calls take. The model is in eval mode."""
    model = sparsify(teacher, routes=measured_route.DENSITY).to(example.device)
    routes = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseConv2d):
            routes[name] = module.density_route(example.device)
            logger.info("cache teacher %s (density %.3f): %s", name, module.density, routes[name])
    return model, routes

"""The teacher's inference form for a cache: sparsify, then each pruned convolution on the faster of its two paths,
measured once on the cache's batch size.

sparsify picks dense or sparse per layer by a density crossover measured on CIFAR VGG layers with 64 or more input
channels. Layers far from that shape do not follow it: a first convolution with one or three input channels is slow
in oneDNN's dense kernel and several times faster in the sparse kernel even at 88% density (the default
Fashion-MNIST teacher pruned globally to 90%). A cache runs its teacher over every view of a data set, so timing
both paths of each such layer once on the real activations costs little and picks right for this machine.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import Tensor, nn

from ptd_sparse.backends import SPARSE_CONV, choose_backend
from ptd_sparse.sparsify import sparsify

logger = logging.getLogger("ptd_sparse.cache")


def _median_seconds(module: nn.Module, x: Tensor, repeats: int) -> float:
    module(x)  # warm-up: the first call derives the sparse pattern's layouts
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.inference_mode()
def inference_form(teacher: nn.Module, example: Tensor, repeats: int = 2) -> nn.Module:
    """sparsify(teacher) with each pruned convolution on whichever of the dense and the sparse path ran faster on
    the activations that `example` [B, C, H, W] (a batch of the cache's size) produces. Returns a new module in
    eval mode on example's device; the choices are logged."""
    device = example.device
    automatic = sparsify(teacher).to(device)
    sparse_backend = choose_backend(SPARSE_CONV, device, None, 0.0)
    if sparse_backend == "reference":  # no sparse kernel on this device: nothing to choose between
        return automatic
    forced = sparsify(teacher, backend=sparse_backend).to(device)
    forced_modules = dict(forced.named_modules())
    differing = [name for name, module in automatic.named_modules() if name and name in forced_modules and
                 type(module) is not type(forced_modules[name])]
    differing = [name for name in differing if not any(name.startswith(other + ".") for other in differing)]
    inputs = {}

    def keeper(name):
        def keep(module, args, output):
            inputs.setdefault(name, args[0])  # returns None: the output is left alone
        return keep

    hooks = [automatic.get_submodule(name).register_forward_hook(keeper(name)) for name in differing]
    automatic(example)
    for hook in hooks:
        hook.remove()
    for name in differing:
        dense_s = _median_seconds(automatic.get_submodule(name), inputs[name], repeats)
        sparse_s = _median_seconds(forced_modules[name], inputs[name], repeats)
        if sparse_s < dense_s:
            _replace(automatic, name, forced_modules[name])
        logger.info("cache teacher %s: dense %.2f ms, sparse %.2f ms -> %s", name, 1e3 * dense_s, 1e3 * sparse_s,
                    "sparse" if sparse_s < dense_s else "dense")
    return automatic.eval()

"""Which path runs an inference call of a SparseConv2d: measured once per input shape bucket, on the real input.

A fixed density crossover cannot say whether a layer gains from its sparse kernel: that depends on the layer's
channels and map size, the batch, and the CPU (the first layer of a network with 1-3 input channels gains from the
sparse kernel even at 90% density; at batch 1 oneDNN's NCHW path falls back to a slow direct convolution that the
channels_last path avoids). So the first inference call of each (batch bucket, map size, dtype, device, layout)
times every route on that very input and remembers the fastest; later calls in the bucket take it at no cost.
Batch sizes are bucketed by powers of two (1, 2, 4, ..., 256, ...), so a loop over a data set with a smaller last
batch measures at most once more. Each route returns its output in its input's layout, converting inside the timed
call, so that a route's cost includes what its layout would otherwise impose on the layers after it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import Tensor

SPARSE, DENSE, DENSE_CHANNELS_LAST = "sparse", "dense", "dense_channels_last"
# oneDNN with the weight reordered into its own blocked layout once (not on every call, as F.conv2d does) and the
# ReLU fused: what torch.jit.freeze + optimize_for_inference and Inductor's CPU freezing run. float32 on CPUs with
# oneDNN only (prepacked_route_available).
DENSE_PREPACKED = "dense_prepacked"
ROUTES = (SPARSE, DENSE, DENSE_CHANNELS_LAST, DENSE_PREPACKED)


def prepacked_route_available(input: Tensor) -> bool:
    """Whether the prepacked oneDNN route can run `input`: float32 on a CPU, torch built with oneDNN."""
    return (input.device.type == "cpu" and input.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def routes_for(input: Tensor) -> tuple[str, ...]:
    """The routes an inference call on `input` may take."""
    return ROUTES if prepacked_route_available(input) else ROUTES[:3]
REPEATS = 3  # timed runs per route, interleaved, after one warm-up each


def batch_bucket(batch: int) -> int:
    """The power of two at or above `batch` (0 for an empty batch)."""
    return 1 << (batch - 1).bit_length() if batch > 0 else 0


def shape_key(input: Tensor) -> tuple:
    """What a measured choice is valid for: the batch bucket, the map size, dtype, device, memory layout."""
    return (batch_bucket(input.shape[0]), tuple(input.shape[2:]), input.dtype, input.device.type,
            input.is_contiguous())


def fastest(routes: dict[str, Callable[[Tensor], Tensor]], input: Tensor) -> tuple[str, dict[str, float]]:
    """(name of the fastest route on `input`, median seconds of each). Runs are interleaved so that a drift of the
    machine's speed during the measurement hits every route alike."""
    for run in routes.values():
        run(input)  # warm-up: first-call set-up (pattern layouts, oneDNN primitives) is not what is compared
    samples = {name: [] for name in routes}
    for _ in range(REPEATS):
        for name, run in routes.items():
            started = time.perf_counter()
            run(input)
            samples[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return min(medians, key=medians.get), medians

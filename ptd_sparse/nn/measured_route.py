"""Which path runs an inference call of a SparseConv2d: measured once per input shape bucket, on the real input.

A fixed density crossover cannot say whether a layer gains from its sparse kernel: that depends on the layer's
channels and map size, the batch, and the CPU (the first layer of a network with 1-3 input channels gains from the
sparse kernel even at 90% density; at batch 1 oneDNN's NCHW path falls back to a slow direct convolution that the
channels_last path avoids). So the first inference call of each (batch bucket, map size, dtype, device, layout)
times every route on that very input and remembers the fastest; later calls in the bucket take it at no cost.
Batch sizes are bucketed by powers of two (1, 2, 4, ..., 256, ...), so a loop over a data set with a smaller last
batch measures at most once more.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from torch import Tensor

SPARSE, DENSE, DENSE_CHANNELS_LAST = "sparse", "dense", "dense_channels_last"
ROUTES = (SPARSE, DENSE, DENSE_CHANNELS_LAST)
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

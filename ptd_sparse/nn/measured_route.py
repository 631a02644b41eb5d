"""Which path runs an inference call of a SparseConv2d: its route, and how the route is chosen.

Routes: the sparse kernel (`sparse`), F.conv2d on the dense weight in NCHW (`dense`) or channels_last
(`dense_channels_last`), and oneDNN with the weight prepacked once and the ReLU fused (`dense_prepacked`, float32 on
CPUs). Every route computes the same convolution and returns its output in its input's layout.

A layer's route policy says how its route is chosen:
- `measure` (the default): the first inference call of each shape bucket times every route on that very input and
  keeps the fastest; on a CPU a dense route only where it takes at most 90% of the sparse kernel's time (DENSE_MARGIN:
  it holds a dense copy of the weight). A fixed density crossover cannot say whether a layer gains from its sparse
  kernel: that depends on its channels and map size, the batch, and the CPU. Buckets round the batch and the map's
  height and width up to powers of two, and a layer measures at most MAX_BUCKETS of them; a call in a further bucket
  takes the route of the nearest bucket measured, so varying input sizes cost a bounded number of measurements and
  memory. The choice depends on timings, so two runs may pick different routes, whose results differ in the last bits.
- `density`: the sparse kernel where the weight is at most as dense as the device's crossover
  (ptd_sparse.backends.dense_crossover), the dense NCHW route above it. Deterministic: what a stored artefact (a
  teacher-logit cache) uses, so that its bytes depend only on the weights and the inputs.
- a route name: that route for every call (no measurement).
- a saved plan (ptd_sparse.route_plan): the routes of each bucket as measured once, elsewhere; no measurement.
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch
from torch import Tensor

SPARSE, DENSE, DENSE_CHANNELS_LAST = "sparse", "dense", "dense_channels_last"
# oneDNN with the weight reordered into its own blocked layout once (not on every call, as F.conv2d does) and the
# ReLU fused: what torch.jit.freeze + optimize_for_inference and Inductor's CPU freezing run.
DENSE_PREPACKED = "dense_prepacked"
ROUTES = (SPARSE, DENSE, DENSE_CHANNELS_LAST, DENSE_PREPACKED)
MEASURE, DENSITY = "measure", "density"
POLICIES = (MEASURE, DENSITY) + ROUTES
MAX_BUCKETS = 8  # measured shape buckets per layer; further buckets borrow the nearest one's route
# Timed runs per route, interleaved, after one warm-up each: at least MIN_REPEATS, then more until the rounds have
# taken MIN_MEASURE_SECONDS in all, at most MAX_REPEATS. With three runs, a layer of 0.2 ms (a ResNet18's 1x1
# downsampling at batch 1) was decided by the noise of a shared machine (spikes of 2x on single runs are common there);
# a large layer still takes three.
MIN_REPEATS, MAX_REPEATS, MIN_MEASURE_SECONDS = 3, 15, 0.05
# On a CPU a dense route holds a dense copy of the weight, 1 / density times the sparse form's bytes (20x at density
# 0.05), kept as long as the route is: it is taken over the sparse kernel only where its median is at least
# DENSE_MARGIN below the kernel's (elsewhere the dense weight is scattered per call and the fastest route wins).
# Closer than that, the two are within the noise of one measurement on a shared machine: a CIFAR VGG19 at 95% sparsity
# measured two of its 256- and 512-channel layers faster dense in one run at batch 1 (7 MB of dense copies, 19% of the
# dense model's weight bytes instead of 10%) and sparse in the next, and its first layers, dense by 3-9% when
# measured, flipped likewise.
DENSE_MARGIN = 0.1


def check_policy(policy: str | None) -> str:
    """`policy` (None means measure) checked against POLICIES."""
    policy = MEASURE if policy is None else policy
    if policy not in POLICIES:
        raise ValueError(f"route must be one of {POLICIES} (or None: measure), got {policy!r}")
    return policy


def prepacked_route_available(input: Tensor) -> bool:
    """Whether the prepacked oneDNN route can run `input`: float32 on a CPU, torch built with oneDNN and oneDNN
    enabled (torch.backends.mkldnn.flags), its private convolution op present, and no CPU autocast (under which the
    other routes compute and return the autocast dtype, and this one could not)."""
    return (input.device.type == "cpu" and input.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and bool(torch.backends.mkldnn.enabled) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and not torch.is_autocast_enabled("cpu"))


def routes_for(input: Tensor) -> tuple[str, ...]:
    """The routes an inference call on `input` may take."""
    return ROUTES if prepacked_route_available(input) else ROUTES[:3]


def runnable(route: str, input: Tensor) -> str:
    """`route`, or the dense NCHW route where `route` cannot run `input` (the prepacked route outside float32 CPU
    calls: a plan or a bucket measured for another dtype or under no autocast)."""
    return DENSE if route == DENSE_PREPACKED and not prepacked_route_available(input) else route


def batch_bucket(batch: int) -> int:
    """The power of two at or above `batch` (0 for an empty batch)."""
    return 1 << (batch - 1).bit_length() if batch > 0 else 0


def shape_key(input: Tensor) -> tuple:
    """The bucket a measured choice is valid for: (batch, height, width) rounded up to powers of two, dtype, device
    type, channels_last, and the autocast dtype in force (None outside autocast)."""
    device = input.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (batch_bucket(int(input.shape[0])), batch_bucket(int(input.shape[2])), batch_bucket(int(input.shape[3])),
            input.dtype, device, not input.is_contiguous(), autocast)


def nearest_key(keys, key: tuple) -> tuple | None:
    """Of `keys`, the one closest to `key`: same dtype, device, layout and autocast first, then the closest batch,
    then the closest map size (in powers of two). None when `keys` is empty."""
    def distance(other: tuple) -> tuple:
        same_kind = other[3:] == key[3:]
        log = lambda n: n.bit_length()  # noqa: E731 - buckets are powers of two
        return (not same_kind, abs(log(other[0]) - log(key[0])),
                abs(log(other[1]) - log(key[1])) + abs(log(other[2]) - log(key[2])))
    return min(keys, key=distance, default=None)


def preferred(medians: dict[str, float], dense_margin: float = DENSE_MARGIN) -> str:
    """The route to take given each route's median seconds: the fastest, except that a dense route must beat the
    sparse kernel (where it was measured) by `dense_margin`: it must take at most (1 - dense_margin) of its time."""
    best = min(medians, key=medians.get)
    if best != SPARSE and SPARSE in medians and medians[best] > (1 - dense_margin) * medians[SPARSE]:
        return SPARSE
    return best


def fastest(routes: dict[str, Callable[[Tensor], Tensor]], input: Tensor) -> tuple[str, dict[str, float]]:
    """(the route to take on `input`, as `preferred` picks it: with DENSE_MARGIN on a CPU, else the fastest; median
    seconds of each). Runs are interleaved so that a drift of the machine's speed during the measurement hits every
    route alike. A route that raises is dropped with a warning naming it and the error; if every route raises, the
    first error propagates."""
    working, first_error = {}, None
    for name, run in routes.items():
        try:
            run(input)  # warm-up: first-call set-up (pattern layouts, oneDNN primitives) is not what is compared
        except Exception as error:  # noqa: BLE001 - any failure of a candidate only removes it from the choice
            first_error = first_error or error
            warnings.warn(f"ptd_sparse: the {name} route failed on input {tuple(input.shape)} "
                          f"({type(error).__name__}: {error}); it is dropped from the choice", RuntimeWarning,
                          stacklevel=3)
            continue
        working[name] = run
    if not working:
        raise first_error
    samples = {name: [] for name in working}
    for repeat in range(1, MAX_REPEATS + 1):
        for name, run in working.items():
            started = time.perf_counter()
            run(input)
            samples[name].append(time.perf_counter() - started)
        if repeat >= MIN_REPEATS and sum(map(sum, samples.values())) >= MIN_MEASURE_SECONDS:
            break
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return preferred(medians, DENSE_MARGIN if input.device.type == "cpu" else 0.0), medians

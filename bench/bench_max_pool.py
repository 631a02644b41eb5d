"""The inference form's max-pools (ptd_sparse.nn.MaxPool2d and MaxPool2x2, csrc/cpu/max_pool2d_cpu.cpp) against
torch's F.max_pool2d on the same tensor, NCHW and channels_last: a torchvision ResNet's stem pool (3x3, stride 2,
padding 1, 64 x 112 x 112) at batch 1 and 64, and the first 2x2 pool of a CIFAR VGG (64 x 32 x 32) at batch 64.
Both forms timed alternately in one process (one call each per round, after warm-up), medians, ratio of medians;
the outputs are checked equal first.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_max_pool.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from machine import cpu_vector_extensions  # bench/
from ptd_sparse.nn import MaxPool2d, MaxPool2x2

CASES = [  # (name, input shape, kernel_size, stride, padding)
    ("ResNet stem pool", (1, 64, 112, 112), 3, 2, 1),
    ("ResNet stem pool", (64, 64, 112, 112), 3, 2, 1),
    ("VGG first pool", (64, 64, 32, 32), 2, 2, 0),
]


def alternating_medians_ms(runs: dict, repeats: int) -> dict[str, float]:
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"float32, torch {torch.__version__}, {torch.get_num_threads()} threads; CPU: {cpu_vector_extensions()}")
    print(f"{'case':>18} {'input':>20} {'window':>8} {'layout':>13} {'torch ms':>9} {'ptd ms':>8} {'speed-up':>8}")
    for name, shape, kernel, stride, padding in CASES:
        pool = MaxPool2x2() if (kernel, stride, padding) == (2, 2, 0) else MaxPool2d(kernel, stride, padding)
        for layout in ("NCHW", "channels_last"):
            x = torch.randn(shape)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                torch.testing.assert_close(pool(x), F.max_pool2d(x, kernel, stride, padding), rtol=0, atol=0)
                ms = alternating_medians_ms({"torch": lambda: F.max_pool2d(x, kernel, stride, padding),
                                             "ptd": lambda: pool(x)}, args.repeats)
            print(f"{name:>18} {'x'.join(map(str, shape)):>20} {f'{kernel}/{stride}/{padding}':>8} {layout:>13} "
                  f"{ms['torch']:>9.3f} {ms['ptd']:>8.3f} {ms['torch'] / ms['ptd']:>8.2f}")


if __name__ == "__main__":
    main()

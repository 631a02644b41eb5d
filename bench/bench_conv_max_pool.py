"""A sparse convolution followed by a max-pool, fused (ptd_sparse_kernels::conv_forward_max_pool: the pool in the
forward's epilogue) against the same two operators in turn (conv_forward then max_pool2d) and against torch (F.conv2d
on the dense pruned weight, ReLU, F.max_pool2d): a torchvision ResNet stem (3 -> 64 channels, 7x7, stride 2, padding
3, 224 x 224 input, ReLU, 3x3 / 2 / 1 pool) at the density global L1 pruning to 90% leaves it (0.107, random mask),
and the last layers of CIFAR VGG blocks with their 2x2 pools (3x3, densities as in VGG19 at 90%: 256@8x8 at 0.32,
512@4x4 and 512@2x2 at 0.045; 128@16x16 at 0.5, whose tiles are single rows, takes the two operators), NCHW and
channels_last, batch 1 and 64. All forms timed alternately in one process (one call each per round, after warm-up), medians, ratios
of medians; the outputs are checked equal first.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_conv_max_pool.py
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_max_pool import alternating_medians_ms  # bench/
from machine import cpu_vector_extensions  # bench/
from ptd_sparse.pattern import ConvPattern

CASES = [  # (name, c_in, c_out, size, kernel, stride, padding, density, pool (kernel, stride, padding))
    ("ResNet stem", 3, 64, 224, 7, 2, 3, 0.107, (3, 2, 1)),
    ("VGG 128@16x16", 128, 128, 16, 3, 1, 1, 0.5, (2, 2, 0)),
    ("VGG 256@8x8", 256, 256, 8, 3, 1, 1, 0.32, (2, 2, 0)),
    ("VGG 512@4x4", 512, 512, 4, 3, 1, 1, 0.045, (2, 2, 0)),
    ("VGG 512@2x2", 512, 512, 2, 3, 1, 1, 0.045, (2, 2, 0)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    kernels = torch.ops.ptd_sparse_kernels
    print(f"float32, torch {torch.__version__}, {torch.get_num_threads()} threads; CPU: {cpu_vector_extensions()}")
    print(f"{'case':>14} {'batch':>5} {'layout':>13} {'torch ms':>9} {'two ops ms':>10} {'fused ms':>9} "
          f"{'vs two ops':>10} {'vs torch':>8}")
    generator = torch.Generator().manual_seed(0)
    for name, c_in, c_out, size, kernel, stride, padding, density, pool in CASES:
        weight = torch.randn(c_out, c_in, kernel, kernel, generator=generator)
        mask = torch.rand(weight.shape, generator=generator) < density
        bias = torch.randn(c_out, generator=generator)
        p = ConvPattern.from_mask(mask)
        dense = weight * mask
        conv_args = (p.gather(weight).contiguous(), p.row_ptr, p.col_idx, list(weight.shape), bias, [stride] * 2,
                     [padding] * 2, [1, 1], True)
        pool_args = ([pool[0]] * 2, [pool[1]] * 2, [pool[2]] * 2, [1, 1])
        for batch in args.batches:
            for layout in ("NCHW", "channels_last"):
                x = torch.randn(batch, c_in, size, size, generator=generator)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                runs = {
                    "torch": lambda: F.max_pool2d(F.relu(F.conv2d(x, dense, bias, stride, padding)), *pool),
                    "two ops": lambda: kernels.max_pool2d(kernels.conv_forward(x, *conv_args), *pool_args),
                    "fused": lambda: kernels.conv_forward_max_pool(x, *conv_args, *pool_args),
                }
                with torch.inference_mode():
                    torch.testing.assert_close(runs["fused"](), runs["two ops"](), rtol=0, atol=0)
                    torch.testing.assert_close(runs["fused"](), runs["torch"](), rtol=1e-4, atol=1e-4)
                    ms = alternating_medians_ms(runs, args.repeats)
                print(f"{name:>14} {batch:>5} {layout:>13} {ms['torch']:>9.3f} {ms['two ops']:>10.3f} "
                      f"{ms['fused']:>9.3f} {ms['two ops'] / ms['fused']:>10.2f} {ms['torch'] / ms['fused']:>8.2f}")


if __name__ == "__main__":
    main()

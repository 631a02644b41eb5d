"""Per-call overhead of the eager path: a small masked convolution and small KD losses through the public API,
against the bare kernel operators and eager PyTorch, in one process. Medians of many calls, microseconds.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_call_overhead.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ptd_sparse
from ptd_sparse.nn import KDLoss, MaskedConv2d
from timing import median_ms  # bench/timing.py


def median_us(fn) -> float:
    return 1e3 * median_ms(fn, warmup=50, repeats=2000)


def main() -> None:
    torch.manual_seed(0)
    kernels = torch.ops.ptd_sparse_kernels
    conv = MaskedConv2d(16, 16, 3, padding=1, backend="cpu")
    conv.set_mask(torch.rand(conv.weight.shape) < 0.3)
    x = torch.randn(1, 16, 8, 8)
    pattern = ptd_sparse.functional.pattern_of(conv.mask)
    values = pattern.gather(conv.weight.detach())
    bias = conv.bias.detach()
    with torch.no_grad():
        bare = median_us(lambda: kernels.conv_forward(x, values, pattern.row_ptr, pattern.col_idx, [16, 16, 3, 3],
                                                      bias, [1, 1], [1, 1], [1, 1], False))
        module = median_us(lambda: conv(x))
    print(f"masked conv 16x16@8x8, batch 1, density 0.3: bare kernel {bare:.1f} us, MaskedConv2d (no grad) "
          f"{module:.1f} us, overhead {module - bare:.1f} us")
    print(f"{'rows x classes':>14} {'bare us':>8} {'fwd us':>8} {'fused f+b us':>12} {'eager f+b us':>12} {'speed-up':>8}")
    for rows, classes in [(64, 10), (256, 100), (128, 1000)]:
        student = torch.randn(rows, classes, requires_grad=True)
        teacher = torch.randn(rows, classes)
        target = torch.randint(0, classes, (rows,))
        criterion = KDLoss(4.0, 0.9, backend="cpu")

        def eager():
            kl = F.kl_div(torch.log_softmax(student / 4, 1), torch.log_softmax(teacher / 4, 1), reduction="batchmean",
                          log_target=True)
            (0.9 * 16 * kl + 0.1 * F.cross_entropy(student, target)).backward()

        bare = median_us(lambda: kernels.kd_loss(student.detach(), teacher, target, 4.0, 0.9, 2, -100, True))
        forward = median_us(lambda: criterion(student, teacher, target))
        fused = median_us(lambda: criterion(student, teacher, target).backward())
        eager_us = median_us(eager)
        print(f"{rows:>6} x {classes:<5} {bare:>8.1f} {forward:>8.1f} {fused:>12.1f} {eager_us:>12.1f} "
              f"{eager_us / fused:>8.2f}")


if __name__ == "__main__":
    main()

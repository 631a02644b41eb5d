"""pytest-benchmark suite of the kernels, baselines side by side (not part of the test run: tests/ holds the tests).

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python -m pytest bench/test_kernels_benchmark.py --benchmark-only \
        --benchmark-group-by=param:case
Each case is timed for the dense/eager baseline and for ptd_sparse's cpu backend; compare within a group.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptd_sparse

CONV_CASES = {"64@32x32": (64, 32), "128@16x16": (128, 16), "256@8x8": (256, 8), "512@4x4": (512, 4),
              "512@2x2": (512, 2)}
LOSS_CASES = {"256x100": (256, 100), "128x1000": (128, 1000), "2048x32000": (2048, 32000)}


def conv_inputs(case: str, density: float):
    channels, size = CONV_CASES[case]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, channels, size, size, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) < density
    return x, weight, mask


@pytest.mark.parametrize("density", [0.1, 0.05])
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("implementation", ["torch_dense", "ptd_cpu"])
def test_conv_forward(benchmark, implementation, case, density):
    x, weight, mask = conv_inputs(case, density)
    dense = weight * mask
    with torch.no_grad():
        if implementation == "torch_dense":
            benchmark(lambda: F.conv2d(x, dense, padding=1))
        else:
            benchmark(lambda: ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend="cpu"))


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("implementation", ["torch_dense", "ptd_cpu"])
def test_conv_forward_backward_at_90_percent(benchmark, implementation, case):
    x, weight, mask = conv_inputs(case, 0.1)
    x.requires_grad_()
    weight.requires_grad_()

    def step():
        if implementation == "torch_dense":
            out = F.conv2d(x, weight * mask, padding=1)
        else:
            out = ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend="cpu")
        torch.autograd.grad(out, (x, weight), torch.ones_like(out))

    benchmark(step)


@pytest.mark.parametrize("case", list(LOSS_CASES))
@pytest.mark.parametrize("implementation", ["torch_eager", "ptd_cpu"])
def test_kd_loss_forward_backward(benchmark, implementation, case):
    rows, classes = LOSS_CASES[case]
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(rows, classes, generator=generator, requires_grad=True)
    teacher = torch.randn(rows, classes, generator=generator)
    target = torch.randint(0, classes, (rows,), generator=generator)

    def step():
        student.grad = None
        if implementation == "torch_eager":
            loss = 0.9 * 16 * F.kl_div(F.log_softmax(student / 4, 1), F.log_softmax(teacher / 4, 1),
                                       reduction="batchmean", log_target=True) + 0.1 * F.cross_entropy(student, target)
        else:
            loss = ptd_sparse.kd_loss(student, teacher, target, temperature=4.0, alpha=0.9, backend="cpu")
        loss.backward()

    benchmark(step)

"""The random tensors of one sparse-training case, drawn in one fixed order. bench_sparse_training.py and
sparseprop_runner.py (which runs in SparseProp's own venv, without ptd_sparse) both take them from here, so both
processes time the same mask. Needs torch only."""
from __future__ import annotations

import torch


def case_tensors(batch: int, channels: int, size: int, density: float):
    """x [batch, C, size, size], weight [C, C, 3, 3], mask (bool, ~density of it set), grad_out like x."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) < density
    grad_out = torch.randn(batch, channels, size, size, generator=generator)
    return x, weight, mask, grad_out

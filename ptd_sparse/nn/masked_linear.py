"""MaskedLinear: nn.Linear computing F.linear(input, weight * mask, bias). Classifier layers are pruned with the
convolutions (global pruning counts them); they are small, so they run on the dense masked path."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device))

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Replace the mask (nonzero means keep) and zero the pruned weights."""
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(self.weight.shape):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, got {shape}")
        self.mask.copy_(mask != 0)
        self.weight.mul_(self.mask)

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel()

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density:.4f}"
